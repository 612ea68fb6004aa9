"""Acting on other users' files through directory descriptors, never through their paths.

Root's ``npipe ls --prune`` (and every server's own start-up reclaim) removes files in
directories that users control. A path is only a request: between root's check of
``/tmp/npipe-1000/.np-x`` and its ``rmtree`` the user can swing a symbolic link on the
way and have root remove someone else's files. So every act here goes through a
descriptor of a directory that was reached without following any link (each component
opened with ``O_NOFOLLOW``) and checked (owner, mode) on the descriptor itself; entries
are named relative to it (``dir_fd=``), checked with ``fstat`` on what was opened, and
never read blocking (a FIFO) or whole (``/dev/zero``).

What a user can still do is rename things inside directories they own: that only changes
which of *their own* files root acts on, which harms nobody else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# Reading a small file a user made: never blocks (a FIFO), never follows a link.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_dir(path: str | os.PathLike[str]) -> int:
    """A descriptor of directory ``path``, reached from ``/`` without following any
    symbolic link (OSError, e.g. ELOOP or ENOTDIR, if one is on the way)."""
    parts = Path(os.path.abspath(path)).parts
    fd = os.open(parts[0], _DIR_FLAGS)
    try:
        for part in parts[1:]:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened_dir(path: str | os.PathLike[str], uid: int | None = None) -> Iterator[int | None]:
    """:func:`open_dir` for a ``with`` block: None if it cannot be opened so, or if
    ``uid`` is given and the directory is not that user's."""
    try:
        fd = open_dir(path)
    except OSError:
        yield None
        return
    try:
        if uid is not None and os.fstat(fd).st_uid != uid:
            yield None
        else:
            yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def opened_child_dir(dir_fd: int, name: str) -> Iterator[int | None]:
    """Entry ``name`` of ``dir_fd`` opened as a directory (None if it is not one: a link,
    a file, a FIFO, or gone)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def read_small(dir_fd: int | None, name: str | os.PathLike[str], owner: int | None,
               limit: int) -> bytes | None:
    """At most ``limit`` bytes of regular file ``name`` (in ``dir_fd``, or a path whose
    last component is not followed), if ``owner`` (when given) owns it; None otherwise."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (owner is not None and st.st_uid != owner):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def fd_path(dir_fd: int, name: str) -> str:
    """A path that reaches entry ``name`` of ``dir_fd`` through the descriptor itself
    (``/proc/self/fd/N/name``: the kernel walks the open directory, not its old path), for
    calls that take no ``dir_fd`` such as ``connect()``."""
    proc = f"/proc/self/fd/{dir_fd}"
    if os.path.isdir(proc):
        return f"{proc}/{name}"
    if sys.platform == "darwin":
        # No /proc: the directory's path as the kernel has it now (F_GETPATH), used
        # only if the entry there is still the one the descriptor sees (not renamed).
        import fcntl

        raw = fcntl.fcntl(dir_fd, fcntl.F_GETPATH, bytes(1024))  # MAXPATHLEN
        path = os.path.join(os.fsdecode(raw.split(b"\0", 1)[0]), name)
        there, here = os.lstat(path), os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino):
            return path
    raise OSError(errno.ENOSYS, "no /proc/self/fd to reach a socket through its directory")


def is_live_at(dir_fd: int, name: str) -> bool:
    """:func:`is_live` for socket ``name`` of ``dir_fd`` (True where it cannot be told:
    nothing is removed then)."""
    try:
        path = fd_path(dir_fd, name)
    except OSError:
        return True
    return is_live(path)


def is_live(path: str | os.PathLike[str]) -> bool:
    """True if something accepts connections on the socket at ``path``.

    The probe does not block: a listener with a full backlog (EAGAIN) is live and busy,
    and cannot hang whoever asks (claiming a name, ``npipe ls``)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError as e:
        if e.errno == errno.EPROTOTYPE:  # a listener of another type (a message pipe's
            return True  # SOCK_SEQPACKET): live all the same
        if isinstance(e, (ConnectionRefusedError, FileNotFoundError, NotADirectoryError)):
            return False
        return isinstance(e, BlockingIOError) or e.errno in (
            errno.EAGAIN, errno.EINPROGRESS, errno.EACCES)
    finally:
        probe.close()


# The name an entry has for a moment while it is being removed (never a pipe's name).
GONE_PREFIX = ".npipe-gone-"


def remove_if_same(dir_fd: int, name: str, ino: int) -> bool:
    """Remove entry ``name`` of ``dir_fd`` only if it is still inode ``ino``.

    unlink() cannot be made conditional, so the entry is first renamed aside (atomic),
    checked, and put back if it turned out to be another (in a shared sticky directory
    another user may have made a new entry of that name meanwhile)."""
    aside = f"{GONE_PREFIX}{secrets.token_hex(6)}"
    try:
        os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        return False
    st = lstat_at(dir_fd, aside)
    if st is not None and st.st_ino == ino:
        with contextlib.suppress(OSError):
            os.unlink(aside, dir_fd=dir_fd)
            return True
        return False
    with contextlib.suppress(OSError):  # not ours to remove: back where it was (never
        os.link(aside, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,  # over a newer one)
                follow_symlinks=False)
    with contextlib.suppress(OSError):
        os.unlink(aside, dir_fd=dir_fd)
    return False


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Remove directory ``name`` of ``dir_fd`` and everything in it, never following a
    link (shutil.rmtree's own ``dir_fd=`` needs Python 3.11)."""
    with opened_child_dir(dir_fd, name) as fd:
        if fd is None:
            return
        _empty(fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=dir_fd)


def _empty(fd: int, depth: int = 0) -> None:
    if depth > 16:  # nothing npipe makes is this deep
        return
    for entry in os.scandir(fd):
        if entry.is_dir(follow_symlinks=False):
            with opened_child_dir(fd, entry.name) as child:
                if child is not None:
                    _empty(child, depth + 1)
            with contextlib.suppress(OSError):
                os.rmdir(entry.name, dir_fd=fd)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.name, dir_fd=fd)
