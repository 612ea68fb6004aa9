"""Claiming a pipe name: bind its Unix socket without stealing a live one.

Like FILE_FLAG_FIRST_PIPE_INSTANCE on Windows, a second server on a live pipe
gets :class:`PipeInUse`; a socket left behind by a dead server is replaced.
The socket is bound under a temporary name, given its mode, then hard-linked to
the pipe's path, so it never appears with the wrong permissions and two servers
racing for a name cannot both win (link fails with EEXIST). A lock file in the
pipe directory serialises the check-then-replace of a stale socket.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from npipe.errors import AccessDenied, PipeInUse
from npipe.identity import user_name
from npipe.local.paths import ensure_pipe_dir

# The kernel caps the backlog at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 1024


@dataclass
class ClaimedSocket:
    """A listening socket bound at ``path``; :meth:`release` unlinks it if it is still ours."""

    sock: socket.socket
    path: Path
    _ino: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        self.sock.close()


def claim(path: Path, lock_dir: Path, *, mode: int = 0o600) -> ClaimedSocket:
    """Bind and listen on ``path``; raise PipeInUse if a live server has it.

    ``lock_dir`` is the (private) pipe directory; the lock is per socket path.
    """
    import fcntl  # POSIX only; importing npipe must work on Windows too

    ensure_pipe_dir(lock_dir)
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    lock_path = lock_dir / f".lock-{digest}"
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        _remove_if_stale(path)
        return _bind_and_link(path, mode)
    finally:
        os.close(lock_fd)  # also drops the flock


def is_live(path: Path) -> bool:
    """True if something accepts connections on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:
        # EAGAIN: a full backlog means a live (busy) listener.
        return e.errno == errno.EAGAIN
    finally:
        probe.close()


def _remove_if_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PipeInUse(f"{path} exists and is not a socket; npipe will not replace it")
    if is_live(path):
        raise PipeInUse(f"pipe {path} is already served by a live server")
    if st.st_uid != os.getuid():
        raise AccessDenied(
            f"stale socket {path} belongs to {user_name(st.st_uid) or st.st_uid}; "
            "only its owner can remove it"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _bind_and_link(path: Path, mode: int) -> ClaimedSocket:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(tmp))
        try:
            os.chmod(tmp, mode)
            sock.listen(LISTEN_BACKLOG)
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    except FileExistsError:
        sock.close()
        raise PipeInUse(f"pipe {path} was claimed by another server just now") from None
    except BaseException:
        sock.close()
        raise
    return ClaimedSocket(sock, path, os.lstat(path).st_ino)
