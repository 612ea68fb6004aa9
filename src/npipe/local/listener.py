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
import json
import os
import re
import secrets
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npipe.address import MAX_UNIX_PATH_BYTES
from npipe.errors import AccessDenied, PipeInUse
from npipe.identity import user_name
from npipe.local.aclnote import MAX_NOTE_BYTES, AclNote, parse_note
from npipe.local.dirfd import (
    is_live as is_live,  # (where npipe's other modules and tests look for it)
)
from npipe.local.dirfd import (
    is_live_at,
    lstat_at,
    opened_child_dir,
    opened_dir,
    read_small,
    remove_tree_at,
)
from npipe.local.namespace import remove_entry
from npipe.local.paths import ensure_pipe_dir

# The kernel caps the backlog at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 1024


@dataclass
class ClaimedPath:
    """A pipe's path, linked to a listening socket; :meth:`release` unlinks it if still ours
    (and the machine-wide name that points at it, if it was published)."""

    path: Path
    _ino: int
    published: Path | None = field(default=None, kw_only=True)
    note: Path | None = field(default=None, kw_only=True)
    lock: Path | None = field(default=None, kw_only=True)

    @property
    def inode(self) -> int:
        """The inode number of the socket at ``path`` (what the ACL note names)."""
        return self._ino

    def release(self) -> None:
        if self.published is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.published)
                if os.readlink(self.published) == os.fspath(self.path):
                    remove_entry(self.published, st.st_ino)
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
                if self.note is not None:
                    os.unlink(self.note)
        if self.lock is not None:
            _remove_own_lock(self.lock)


def _remove_own_lock(lock_file: Path) -> None:
    """Remove the name's lock file (and record) if it is still this process's: lock files
    do not pile up, one per name ever served (under its lock: see :func:`locked`)."""
    with contextlib.suppress(OSError), locked(lock_file, create=False) as lock_fd:
        if lock_fd is not None and read_record(lock_fd).get("pid") == os.getpid():
            os.unlink(lock_file)


@dataclass
class ClaimedSocket(ClaimedPath):
    """A listening socket of our own at ``path``."""

    sock: socket.socket

    def release(self) -> None:
        super().release()
        self.sock.close()


def claim(
    path: Path, lock_dir: Path, *, mode: int = 0o600, private: Path | None = None,
    sock_type: int = socket.SOCK_STREAM,
) -> ClaimedSocket:
    """Bind and listen on ``path``; raise PipeInUse if a live server has it.

    ``lock_dir`` is the (private) pipe directory; the lock is per socket path.
    ``private`` is a directory the server keeps beside the pipe (the backend socket):
    it is recorded so that whoever replaces this server's socket once it is dead
    removes that directory too. ``sock_type`` is SOCK_STREAM for a byte-mode pipe,
    SOCK_SEQPACKET for a message-mode one (npipe.local.messages).
    """
    with _name_lock(path, lock_dir) as lock_fd:
        _remove_if_stale(path, lock_fd)
        claimed = _bind(path, mode, sock_type)
        write_record(lock_fd, path, private)
        claimed.lock = lock_path(path, lock_dir)
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
        write_record(lock_fd, path, private)
        return ClaimedPath(path, os.lstat(path).st_ino, lock=lock_path(path, lock_dir))


@contextlib.contextmanager
def _name_lock(path: Path, lock_dir: Path) -> Iterator[int]:
    """Serialise the check-then-replace of one pipe name among this user's servers."""
    ensure_pipe_dir(lock_dir)
    with locked(lock_path(path, lock_dir), create=True) as lock_fd:
        assert lock_fd is not None
        yield lock_fd


@contextlib.contextmanager
def locked(lock_file: Path, *, create: bool) -> Iterator[int | None]:
    """Hold the flock of ``lock_file`` (None if it does not exist and not ``create``).

    Whoever reclaims a dead server's files removes its lock file while holding the lock,
    so a lock taken on a file that has meanwhile been unlinked is taken again on the new one.
    """
    import fcntl  # POSIX only; importing npipe must work on Windows too

    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    while True:
        try:
            lock_fd = os.open(lock_file, flags, 0o600)
        except FileNotFoundError:
            if create:  # (O_CREAT: it is the directory that is missing)
                raise
            yield None
            return
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                same = os.stat(lock_file).st_ino == os.fstat(lock_fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield lock_fd
                return
        finally:
            os.close(lock_fd)  # also drops the flock


LOCK_PREFIX = ".lock-"
# Beside a pipe's socket: who its ACL admits, in words (npipe ls) and in numbers (a
# client telling a refusal from a crash): npipe.local.aclnote.
NOTE_PREFIX = ".acl-"


def note_path(socket_path: Path) -> Path:
    return socket_path.with_name(f"{NOTE_PREFIX}{socket_path.name}")


def write_note(socket_path: Path, content: bytes, mode: int) -> Path:
    note = note_path(socket_path)
    temp = note.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, content)
    finally:
        os.close(fd)
    os.replace(temp, note)
    return note


def read_acl_note(socket_path: Path, owner: int | None) -> AclNote | None:
    """The ACL note beside a socket, if it is a regular file of ``owner`` (the pipe's
    holder): never a link, a FIFO (which would block ``npipe ls``) or a device, and never
    more than MAX_NOTE_BYTES (``/dev/zero``)."""
    raw = read_small(None, note_path(socket_path), owner, MAX_NOTE_BYTES)
    return None if raw is None else parse_note(raw)


def read_note(socket_path: Path, owner: int | None) -> str | None:
    """Who the ACL note beside a socket says its pipe admits, in words (see
    :func:`read_acl_note`)."""
    note = read_acl_note(socket_path, owner)
    return None if note is None else note.text


def lock_path(path: Path, lock_dir: Path) -> Path:
    """The lock (and record) file of socket ``path`` in its owner's pipe directory."""
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return lock_dir / f"{LOCK_PREFIX}{digest}"


# The names private_dir gives; a dead server's directory is removed only if it has one.
PRIVATE_DIR_PREFIXES = ("npipe-", ".np-")
BACKEND_SOCKET = "g"


def private_dir(parent: Path | None = None) -> Path:
    """A fresh 0700 directory for a server's backend socket (and the relay's bound names),
    in ``parent`` (the pipe directory: where whoever cleans up after a killed server
    looks), or under /tmp when the paths inside would not fit in a socket address
    (sun_path holds 107 bytes). It records its maker (see :func:`remove_private_dir`)."""
    if parent is not None and len(os.fsencode(parent)) <= MAX_PRIVATE_PARENT_BYTES:
        directory = Path(tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIXES[1], dir=parent))
    else:
        base = Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())
        directory = Path(tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIXES[1], dir=base))
    owner = {"pid": os.getpid(), "start": process_start(os.getpid())}
    (directory / OWNER_FILE).write_text(json.dumps(owner))
    return directory


OWNER_FILE = "owner"
# A private directory without an owner record (made by an older npipe) is taken for dead
# only once it is this old and nothing listens in it: never one being set up right now.
UNRECORDED_GRACE = 60.0


# Room for "/.np-XXXXXXXX/c<counter>" after the parent within sun_path's 107 bytes.
MAX_PRIVATE_PARENT_BYTES = MAX_UNIX_PATH_BYTES - len("/.np-XXXXXXXX/c123456789")


def write_record(lock_fd: int, path: Path, private: Path | None) -> None:
    """Note who serves ``path`` (pid and its start time, against pid reuse) and the
    private directory beside it, for whoever reclaims them once the server is dead."""
    record = {"path": os.fspath(path), "pid": os.getpid(), "start": process_start(os.getpid())}
    if private is not None:
        record["private"] = os.fspath(private)
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, json.dumps(record).encode(), 0)


def read_record(lock_fd: int) -> dict[str, Any]:
    raw = os.pread(lock_fd, 8192, 0)
    if not raw:
        return {}
    try:
        record = json.loads(raw)
    except ValueError:
        return {"private": os.fsdecode(raw)}  # written by an older npipe: the path alone
    return record if isinstance(record, dict) else {}


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None if it does not exist:
    a pid with another start time is another process (pids are reused)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = raw[raw.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22, starttime


def record_alive(record: dict[str, Any]) -> bool:
    """True while the process that wrote ``record`` still runs."""
    pid, start = record.get("pid"), record.get("start")
    if not isinstance(pid, int):
        return False
    if start is None:  # no /proc (not Linux): only whether some process has that pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return bool(process_start(pid) == start)


def _remove_dead_private_dir(lock_fd: int) -> None:
    """Remove the private directory a dead server recorded, if it is surely its own."""
    record = read_record(lock_fd)
    if record.get("private"):
        remove_private_dir(Path(record["private"]), os.geteuid())


def remove_private_dir(private: Path, uid: int) -> bool:
    """Remove a dead server's private directory (one that npipe made, of ``uid``) that a
    record names. Only a directory right inside a directory of ``uid``'s own, or inside a
    root-owned sticky one (/tmp), reached without following any link, is looked at, and
    only through descriptors (npipe.local.dirfd): never a path that its user could
    redirect between the checks and the removal."""
    parent = Path(os.path.abspath(private)).parent
    with opened_dir(parent) as parent_fd:
        if parent_fd is None:
            return False
        pst = os.fstat(parent_fd)
        shared = pst.st_uid == 0 and bool(pst.st_mode & stat.S_ISVTX)
        if not (shared or pst.st_uid == uid):
            return False
        return remove_private_dir_at(parent_fd, private.name, uid)


def remove_private_dir_at(parent_fd: int, name: str, uid: int) -> bool:
    """Remove private directory ``name`` of ``parent_fd`` if npipe made it for a server
    of ``uid`` that is dead and nothing listens in it."""
    if not name.startswith(PRIVATE_DIR_PREFIXES) or _PIPE_DIR_NAME.match(name):
        return False  # (npipe-<uid> is a user's pipe directory, not a private one)
    with opened_child_dir(parent_fd, name) as fd:
        if fd is None:
            return False
        st = os.fstat(fd)
        if st.st_uid != uid or stat.S_IMODE(st.st_mode) != 0o700:
            return False
        if lstat_at(fd, OWNER_FILE) is None:
            owner: object = None
        else:
            raw = read_small(fd, OWNER_FILE, uid, 4096)
            try:
                owner = json.loads(raw) if raw is not None else False
            except ValueError:
                owner = False
        if owner is None:
            # Made by an older npipe (no record): only a directory holding nothing but
            # what those made (the backend socket, a bridge's socket, relay names), and
            # not new.
            if time.time() - st.st_mtime < UNRECORDED_GRACE or not _only_npipe_sockets(fd):
                return False
        elif not isinstance(owner, dict) or record_alive(owner):
            return False
        if any(is_live_at(fd, name) for name in os.listdir(fd)
               if (est := lstat_at(fd, name)) is not None and stat.S_ISSOCK(est.st_mode)):
            return False
    remove_tree_at(parent_fd, name)
    return True


# A user's pipe directory in /tmp (npipe-<uid>): never taken for a private directory.
_PIPE_DIR_NAME = re.compile(r"npipe-[0-9]+\Z")
_OLD_PRIVATE_ENTRY = re.compile(r"(?:g|b|c[0-9]+)\Z")


def _only_npipe_sockets(fd: int) -> bool:
    try:
        return all(_OLD_PRIVATE_ENTRY.match(name) for name in os.listdir(fd))
    except OSError:
        return False


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


def _bind(path: Path, mode: int, sock_type: int = socket.SOCK_STREAM) -> ClaimedSocket:
    """Listen at ``path``: bound under a temporary name, given its mode, listening, and
    only then hard-linked into place, so the name never appears more open than ``mode``
    nor before a server accepts on it (whoever reclaims stale sockets would take a bound
    but not yet listening socket for a dead one)."""
    temp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}")
    if len(os.fsencode(temp)) > MAX_UNIX_PATH_BYTES:
        temp = path  # no room for a longer name: bind in place
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        # bind() creates the file with the socket inode's mode less the umask: set it
        # first, then put back what the umask took (0666 for ACL'd pipes).
        os.fchmod(sock.fileno(), mode)
        sock.bind(os.fspath(temp))
        os.chmod(temp, mode)
        sock.listen(LISTEN_BACKLOG)
        if temp != path:
            try:
                os.link(temp, path)
            finally:
                os.unlink(temp)
    except OSError as e:
        sock.close()
        if e.errno in (errno.EADDRINUSE, errno.EEXIST):
            raise PipeInUse(f"pipe {path} was claimed by another server just now") from None
        raise
    return ClaimedSocket(path, os.lstat(path).st_ino, sock)


# The name a socket is bound under until it listens (a dead one is reclaimed like any).
TEMP_PREFIX = ".b"
