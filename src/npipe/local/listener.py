"""Claiming a pipe name: bind its Unix socket without stealing a live one.

Like FILE_FLAG_FIRST_PIPE_INSTANCE on Windows, a second server on a live pipe
gets :class:`PipeInUse`; a socket left behind by a dead server is replaced.
The socket's mode is set before bind(), so it never appears more open than it
should; two servers racing for a name cannot both win (bind fails with
EADDRINUSE), and a lock file in the pipe directory serialises the
check-then-replace of a stale socket among one user's servers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from npipe.errors import AccessDenied, PipeInUse
from npipe.identity import user_name
from npipe.local.paths import ensure_pipe_dir

# The kernel caps the backlog at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 1024


@dataclass
class ClaimedPath:
    """A pipe's path, linked to a listening socket; :meth:`release` unlinks it if still ours."""

    path: Path
    _ino: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)


@dataclass
class ClaimedSocket(ClaimedPath):
    """A listening socket of our own at ``path``."""

    sock: socket.socket

    def release(self) -> None:
        super().release()
        self.sock.close()


def claim(
    path: Path, lock_dir: Path, *, mode: int = 0o600, private: Path | None = None
) -> ClaimedSocket:
    """Bind and listen on ``path``; raise PipeInUse if a live server has it.

    ``lock_dir`` is the (private) pipe directory; the lock is per socket path.
    ``private`` is a directory the server keeps beside the pipe (the backend socket):
    it is recorded so that whoever replaces this server's socket once it is dead
    removes that directory too.
    """
    with _name_lock(path, lock_dir) as lock_fd:
        _remove_if_stale(path, lock_fd)
        claimed = _bind(path, mode)
        _record_private_dir(lock_fd, private)
        return claimed


def claim_existing(
    socket_path: Path, path: Path, lock_dir: Path, *, mode: int, private: Path | None = None
) -> ClaimedPath:
    """Give a socket that someone else (grpcio) listens on the pipe's name ``path``."""
    with _name_lock(path, lock_dir) as lock_fd:
        _remove_if_stale(path, lock_fd)
        os.chmod(socket_path, mode)
        try:
            os.link(socket_path, path)
        except FileExistsError:
            raise PipeInUse(f"pipe {path} was claimed by another server just now") from None
        _record_private_dir(lock_fd, private)
        return ClaimedPath(path, os.lstat(path).st_ino)


@contextlib.contextmanager
def _name_lock(path: Path, lock_dir: Path) -> Iterator[int]:
    """Serialise the check-then-replace of one pipe name among this user's servers."""
    import fcntl  # POSIX only; importing npipe must work on Windows too

    ensure_pipe_dir(lock_dir)
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    lock_fd = os.open(lock_dir / f".lock-{digest}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        yield lock_fd
    finally:
        os.close(lock_fd)  # also drops the flock


# The names private_dir gives; a dead server's directory is removed only if it has one.
PRIVATE_DIR_PREFIXES = ("npipe-", ".np-")
BACKEND_SOCKET = "g"


def private_dir(parent: Path | None = None) -> Path:
    """A fresh 0700 directory for a server's backend socket (and the relay's bound names).

    By default under /tmp: its paths must stay short (sun_path holds 107 bytes),
    whatever the length of the pipe's own path.
    """
    if parent is not None:
        return Path(tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIXES[1], dir=parent))
    base = Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIXES[0], dir=base))


def _record_private_dir(lock_fd: int, private: Path | None) -> None:
    os.ftruncate(lock_fd, 0)
    if private is not None:
        os.pwrite(lock_fd, os.fsencode(private), 0)


def _remove_dead_private_dir(lock_fd: int) -> None:
    """Remove the private directory a dead server recorded, if it is surely its own."""
    recorded = os.pread(lock_fd, 4096, 0)
    if not recorded:
        return
    private = Path(os.fsdecode(recorded))
    try:
        st = os.lstat(private)
    except OSError:
        return
    if (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.getuid()
        and stat.S_IMODE(st.st_mode) == 0o700
        and private.name.startswith(PRIVATE_DIR_PREFIXES)
        and not is_live(private / BACKEND_SOCKET)
    ):
        shutil.rmtree(private, ignore_errors=True)


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


def _remove_if_stale(path: Path, lock_fd: int) -> None:
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
    _remove_dead_private_dir(lock_fd)


def _bind(path: Path, mode: int) -> ClaimedSocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file with the socket inode's mode less the umask: set it
        # first, so the name never appears more open than ``mode``.
        os.fchmod(sock.fileno(), mode)
        sock.bind(os.fspath(path))
        os.chmod(path, mode)  # put back what the umask took (0666 for ACL'd pipes)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PipeInUse(f"pipe {path} was claimed by another server just now") from None
        raise
    return ClaimedSocket(path, os.lstat(path).st_ino, sock)
