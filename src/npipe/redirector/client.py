"""Asking the user's redirector to open a remote pipe and relay a socket to it; starting
the redirector when none runs.

The redirector of a user listens on ``<pipe dir>/.smb-redirector-<key>``: the pipe
directory is the user's own (0700, checked), and the listener is checked again with
SO_PEERCRED (same uid) before a password is sent to it. ``key`` digests what must be
the same for two processes to share one redirector: npipe's version and files, the
Python that runs it, the network and user namespaces (a redirector started in one
network namespace reaches hosts from there), and the environment that shapes SMB
(Kerberos' ``KRB5*``, ``NPIPE_SMB_*``). The first process that needs one starts it
(under a lock, so two never start two) as ``python -m npipe.redirector``, in its own
session, with an environment that holds no credentials; credentials travel only in
each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from npipe.address import MAX_UNIX_PATH_BYTES, PipeAddress
from npipe.errors import ConnectionLost, RedirectorUnavailable
from npipe.local.paths import ensure_pipe_dir, pipe_dir
from npipe.local.peercred import peer_credentials
from npipe.local.sockets import close_gently
from npipe.redirector import protocol, wire
from npipe.smb.credentials import (
    ENV_AUTH_PROTOCOL,
    ENV_DOMAIN,
    ENV_PASSWORD,
    ENV_USER,
    Credentials,
)
from npipe.smb.info import SmbConnectionInfo

log = logging.getLogger("npipe.redirector")

PREFIX = ".smb-redirector-"
START_TIMEOUT = 15.0  # a cold Python importing npipe's SMB client on a loaded machine
# How much longer than the attach's own timeout a process waits for the answer.
ANSWER_GRACE = 5.0
# What the redirector's environment must not carry: it takes credentials per request.
SECRET_ENV = (ENV_USER, ENV_PASSWORD, ENV_DOMAIN, ENV_AUTH_PROTOCOL, "NPIPE_SERVICE_PASSWORD")
# Environment that changes how SMB behaves: part of the key.
_SHAPING_ENV = ("KRB5", "NPIPE_SMB_")


@dataclass(frozen=True)
class Paths:
    socket: Path
    lock: Path
    log: Path


def key() -> str:
    """What two processes must share to share a redirector, digested."""
    import npipe

    digest = hashlib.blake2b(digest_size=8)
    parts: list[object] = [protocol.VERSION, npipe.__version__, npipe.__file__,
                           sys.executable, os.getuid()]
    for ns in ("net", "user"):
        try:
            parts.append((ns, os.stat(f"/proc/self/ns/{ns}").st_ino))
        except OSError:
            parts.append((ns, None))
    parts += sorted((k, v) for k, v in os.environ.items() if k.startswith(_SHAPING_ENV))
    digest.update(repr(parts).encode())
    return digest.hexdigest()


def paths(directory: Path | None = None) -> Paths:
    base = ensure_pipe_dir(directory if directory is not None else pipe_dir())
    name = PREFIX + key()
    sock = base / name
    if len(os.fsencode(sock)) > MAX_UNIX_PATH_BYTES:
        raise RedirectorUnavailable(
            f"the redirector's socket path {sock} is longer than a Unix socket address "
            f"holds ({MAX_UNIX_PATH_BYTES} bytes): set NPIPE_PIPE_DIR to a shorter directory")
    return beside(sock)


def beside(sock: Path) -> Paths:
    """The redirector's files named after its socket (the redirector removes them by
    these names when it exits)."""
    return Paths(sock, sock.with_name(sock.name + ".lock"), sock.with_name(sock.name + ".log"))


def _connect_now(where: Paths) -> socket.socket | None:
    """A connection to the running redirector (checked: same uid), or None if none runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(where.socket))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as e:
        sock.close()
        raise RedirectorUnavailable(f"cannot reach the redirector at {where.socket}: {e}") \
            from e
    try:
        pid, uid, _gid = peer_credentials(sock)
    except OSError as e:
        sock.close()
        raise RedirectorUnavailable(f"no peer credentials from {where.socket}: {e}") from e
    if uid != os.getuid():  # (the directory is ours: only root could have done this)
        sock.close()
        raise RedirectorUnavailable(
            f"{where.socket} is served by uid {uid} (pid {pid}), not by this user")
    return sock


def connect(where: Paths | None = None) -> socket.socket:
    """A connection to this user's redirector, started first if none runs (blocking:
    at most START_TIMEOUT seconds)."""
    where = where if where is not None else paths()
    sock = _connect_now(where)
    if sock is not None:
        return sock
    with _locked(where.lock):
        sock = _connect_now(where)  # started by another process meanwhile
        if sock is not None:
            return sock
        _start(where)
        sock = _connect_now(where)
    if sock is None:
        raise RedirectorUnavailable(f"the redirector started but {where.socket} refuses")
    return sock


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """Hold the lock file ``path`` (made if missing). A redirector that exits removes it
    while holding it: the file locked must still be the one at ``path``."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        fd = os.open(path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise RedirectorUnavailable(f"{path} is not this user's lock file")
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RedirectorUnavailable(
                            f"{path} stayed locked for {START_TIMEOUT:g} s") from None
                    time.sleep(0.02)
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_ino == st.st_ino:
                    yield fd
                    return
        finally:
            os.close(fd)


LOG_KEEP = 1 << 20  # a log file larger than this is started afresh


def _start(where: Paths) -> None:
    """Start the redirector (the lock held) and wait until it listens."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(where.socket)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
            os.unlink(where.socket)  # a dead one's: nothing answered on it
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    log_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(where.log).st_size > LOG_KEEP:
            log_flags |= os.O_TRUNC
    ready_r, ready_w = os.pipe()
    try:
        log_fd = os.open(where.log, log_flags, 0o600)
        try:
            argv = [sys.executable, "-m", "npipe.redirector", "--socket",
                    os.fspath(where.socket), "--ready-fd", str(ready_w)]
            # The redirector forks once more and this child exits: nobody has to reap it.
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd,
                                     stderr=log_fd, pass_fds=(ready_w,), env=env, cwd="/",
                                     start_new_session=True)
        finally:
            os.close(log_fd)
        os.close(ready_w)
        ready_w = -1
        child.wait(START_TIMEOUT)
        said = _read_until_closed(ready_r, START_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as e:
        raise RedirectorUnavailable(f"could not start the redirector: {e}") from e
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    if said != b"ready":
        raise RedirectorUnavailable(
            f"the redirector did not start (said {said!r}; its log: {where.log}):"
            f"\n{_tail(where.log)}")
    log.debug("started the redirector on %s", where.socket)


def _read_until_closed(fd: int, timeout: float) -> bytes:
    import select

    deadline = time.monotonic() + timeout
    got = b""
    while len(got) < 64:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 64)
        if not data:
            break
        got += data
    return got


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- asking it ------------------------------------------------------------------------


async def attach(
    backend: str, address: PipeAddress, sock: socket.socket, *, credentials: Credentials,
    timeout: float, encrypt: bool | None, allow_smb2: bool, close_on_failure: bool = True,
    initial: bytes = b"", missing_grace: float | None = None, tied: bool = False,
) -> socket.socket | None:
    """As :meth:`npipe.smb.PipeClient.attach`, done by the user's redirector: it opens the
    pipe and relays ``sock``, whose descriptor here is then closed. With ``tied``, the
    return is the connection that stands for the relay (closing or shutting it down ends
    the relay; it closes itself when the relay ends); else None.

    RedirectorUnavailable when it cannot be started or reached (nothing was done then,
    ``sock`` is untouched)."""
    loop = asyncio.get_running_loop()
    request = protocol.AttachRequest(
        backend, address, credentials, timeout, encrypt, allow_smb2, initial,
        missing_grace, tied).encode()
    control: socket.socket | None = None
    for attempt in (1, 2):
        control = await loop.run_in_executor(None, connect)
        control.setblocking(False)
        try:
            await wire.send_frame(loop, control, request, sock.fileno())
            reply, _ = await asyncio.wait_for(wire.read_frame(loop, control),
                                              timeout + ANSWER_GRACE)
            break
        except (ConnectionResetError, BrokenPipeError) as e:
            # It closed its listener (idle exit) with this connection still unaccepted:
            # the request was never read. Once more, with a new one.
            control.close()
            if attempt == 2:
                raise RedirectorUnavailable(f"the redirector went away twice: {e}") from e
        except BaseException:
            control.close()
            raise
    assert control is not None
    if reply is None:
        control.close()
        if close_on_failure:
            close_gently(sock)
        raise ConnectionLost("the redirector ended the request without an answer (see its "
                             f"log: {paths().log})")
    try:
        failure = protocol.decode_reply(reply)
    except BaseException:
        control.close()
        raise
    if failure is not None:
        control.close()
        if close_on_failure:
            close_gently(sock)
        raise failure
    sock.close()  # (the redirector has the socket; this descriptor only kept it open)
    if not tied:
        control.close()
        return None
    wire.close_when_ended(loop, control)
    return control


async def _connections(backend: str, op: str) -> list[SmbConnectionInfo]:
    loop = asyncio.get_running_loop()
    where = paths()
    control = await loop.run_in_executor(None, _connect_now, where)
    if control is None:
        return []
    with control:
        control.setblocking(False)
        await wire.send_frame(loop, control, protocol.encode_connections_request(backend, op))
        reply, _ = await asyncio.wait_for(wire.read_frame(loop, control), ANSWER_GRACE)
    if reply is None:
        raise ConnectionLost("the redirector ended the request without an answer")
    return protocol.decode_connections(reply)


def connections(backend: str, *, close: bool = False) -> list[SmbConnectionInfo]:
    """The SMB connections of this user's redirector (of ``backend``), if one runs; []
    if none does. It is not started for this. ``close``: close them first (pipes and
    all), then say what is left."""
    from npipe import ioloop

    op = "close_connections" if close else "connections"
    return ioloop.run(_connections(backend, op), ANSWER_GRACE + 1)
