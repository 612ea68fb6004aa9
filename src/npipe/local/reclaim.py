"""Reclaiming what killed servers left behind: stale sockets, names, private directories.

A server that exits cleanly removes what it made. One that is killed (SIGKILL, a crash,
the OOM killer) cannot, so every server, when it starts, removes what dead servers of the
same user left, and ``npipe ls --prune`` does the same on demand (as root: for every
user). Something is removed only once it is proven dead on two counts: no process with
the recorded pid and start time (pids are reused: the start time tells them apart), and
nothing accepting on its socket. Removal of a name happens under that name's lock, the
same one a server holds while it claims the name, so a new server that takes a stale
name at the same moment never loses its fresh socket. A live server's files, and another
user's (unless root prunes), are never touched; root acts only through descriptors of
directories it checked (npipe.local.dirfd), never on a path a user wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from npipe.local.dirfd import (
    GONE_PREFIX,
    is_live_at,
    lstat_at,
    opened_child_dir,
    opened_dir,
    remove_if_same,
)
from npipe.local.listener import (
    LOCK_PREFIX,
    NOTE_PREFIX,
    PRIVATE_DIR_PREFIXES,
    read_record,
    record_alive,
    remove_private_dir,
    remove_private_dir_at,
)
from npipe.local.namespace import (
    own_user_dirs,
    published_socket,
    usable_machine_dir,
    user_dir_owner,
)
from npipe.local.paths import DOTNET_PREFIX, pipe_dir

log = logging.getLogger("npipe.reclaim")


def reclaim(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove what this user's dead servers left; returns what was removed.

    Looks in the pipe directory (``directory`` or the default), this user's directories
    of machine-wide sockets and the names that point into them, and /tmp (private
    directories of older servers, .NET-style sockets).
    """
    uid = os.geteuid()
    removed: list[Path] = []
    machine = usable_machine_dir()
    dirs = [pipe_dir(directory)]
    if machine is not None:
        dirs += own_user_dirs(machine, uid)
    for d in dirs:
        removed += _reclaim_pipe_dir(d, uid)
    if machine is not None:
        removed += _reclaim_names(machine, {uid})
    removed += _reclaim_tmp({uid})
    return removed


def reclaim_all() -> list[Path]:
    """As root: the same for every user, wherever npipe puts pipes.

    Root acts only on what it found itself, through descriptors of directories it
    reached without following links and checked (npipe.local.dirfd): a path that a user
    wrote (a record, a link) is never followed to something of another user's. It never
    waits on a lock that a user holds, and never reads more than a few bytes of a file.
    """
    if os.geteuid() != 0:
        return reclaim()
    removed: list[Path] = []
    machine = usable_machine_dir()
    for d in _every_pipe_dir(machine):
        with contextlib.suppress(OSError):
            removed += _reclaim_pipe_dir(d, os.lstat(d).st_uid)
    if machine is not None:
        removed += _reclaim_names(machine, None)
    removed += _reclaim_tmp(None)
    return removed


def quietly(directory: str | os.PathLike[str] | None = None) -> None:
    """:func:`reclaim` at a server's start: logged, never in the server's way."""
    try:
        removed = reclaim(directory)
    except Exception:
        log.debug("reclaiming dead servers' files failed", exc_info=True)
        return
    if removed:
        log.info("removed %d things dead npipe servers left: %s", len(removed),
                 ", ".join(map(str, removed[:5])) + (" ..." if len(removed) > 5 else ""))


def _every_pipe_dir(machine: Path | None) -> Iterator[Path]:
    yield from (Path("/tmp") / n for n in _names(Path("/tmp")) if _PIPE_DIR_NAME.match(n))
    yield from (Path("/run/user") / n / "npipe" for n in _names(Path("/run/user")))
    if machine is not None:
        yield from (machine / n for n in _names(machine) if user_dir_owner(n) is not None)
    env = os.environ.get("NPIPE_PIPE_DIR")
    if env:
        yield Path(env)


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _reclaim_pipe_dir(directory: Path, uid: int) -> list[Path]:
    """One user's pipe directory: recorded names first (under their locks), then sockets
    and private directories that no record names."""
    removed: list[Path] = []
    with opened_dir(directory, uid) as dir_fd:
        if dir_fd is None:
            return removed
        names = os.listdir(dir_fd)
        live: set[Path] = set()  # sockets of servers that still run: not even probed
        for name in names:
            if name.startswith(LOCK_PREFIX):
                removed += _reclaim_recorded(dir_fd, directory, name, uid, live)
        for name in names:
            if name.startswith(LOCK_PREFIX) or directory / name in live:
                continue
            if name.startswith(PRIVATE_DIR_PREFIXES):
                if remove_private_dir_at(dir_fd, name, uid):
                    removed.append(directory / name)
            elif _remove_dead_socket_at(dir_fd, name, uid):
                removed.append(directory / name)
        for name in names:
            if name.startswith(NOTE_PREFIX) and lstat_at(dir_fd, name[len(NOTE_PREFIX):]) is None:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(directory / name)
    return removed


def _reclaim_recorded(dir_fd: int, directory: Path, lock_name: str, uid: int,
                      live: set[Path]) -> list[Path]:
    removed: list[Path] = []
    with _try_lock_at(dir_fd, lock_name, uid) as lock_fd:
        if lock_fd is None:
            return removed  # held (a server claiming its name right now), or not a lock
        record = read_record(lock_fd)
        path = Path(record["path"]) if isinstance(record.get("path"), str) else None
        if record_alive(record):
            if path is not None:
                live.add(path)
            return removed
        if path is not None:
            outcome = _remove_recorded_socket(path, uid)
            if outcome == "live":
                return removed  # alive after all (another process took the name): keep
            if outcome == "removed":
                removed.append(path)
        private = record.get("private")
        if isinstance(private, str) and remove_private_dir(Path(private), uid):
            removed.append(Path(private))
        os.unlink(lock_name, dir_fd=dir_fd)  # under its lock: see npipe.local.listener.locked
        removed.append(directory / lock_name)
    return removed


@contextlib.contextmanager
def _try_lock_at(dir_fd: int, name: str, uid: int) -> Iterator[int | None]:
    """The lock of lock file ``name`` of ``dir_fd``, if it is a regular file of ``uid``'s
    and nobody holds it (a lock that a user holds for ever must not stop a prune)."""
    import fcntl  # POSIX only

    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        yield None
        return
    try:
        st = os.fstat(fd)
        now = None
        if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                now = lstat_at(dir_fd, name)
            except OSError:
                now = None
        yield fd if now is not None and now.st_ino == st.st_ino else None
    finally:
        os.close(fd)  # also drops the flock


def _remove_recorded_socket(path: Path, uid: int) -> str:
    """A dead server's socket, named by its record: "removed", "gone" (nothing there, or
    nowhere npipe acts: not in a directory of ``uid``'s own or a root-owned sticky one,
    reached without links), or "live"."""
    with opened_dir(path.parent) as dir_fd:
        if dir_fd is None:
            return "gone"
        pst = os.fstat(dir_fd)
        if not (pst.st_uid == uid or (pst.st_uid == 0 and pst.st_mode & stat.S_ISVTX)):
            return "gone"
        st = lstat_at(dir_fd, path.name)
        if st is None or not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            return "gone"
        if is_live_at(dir_fd, path.name):
            return "live"
        return "removed" if remove_if_same(dir_fd, path.name, st.st_ino) else "gone"


def _remove_dead_socket_at(dir_fd: int, name: str, uid: int) -> bool:
    st = lstat_at(dir_fd, name)
    if st is None or not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
        return False
    return not is_live_at(dir_fd, name) and remove_if_same(dir_fd, name, st.st_ino)


def _reclaim_names(machine: Path, uids: set[int] | None) -> list[Path]:
    """Machine-wide names (links) of ``uids`` (None: anyone's) whose socket is gone, or
    that do not point where npipe puts sockets (clients refuse those anyway)."""
    removed: list[Path] = []
    with opened_dir(machine, 0) as machine_fd:
        if machine_fd is None:
            return removed
        for name in os.listdir(machine_fd):
            if user_dir_owner(name) is not None or name.startswith(GONE_PREFIX):
                continue
            st = lstat_at(machine_fd, name)
            if st is None or (uids is not None and st.st_uid not in uids):
                continue
            if stat.S_ISLNK(st.st_mode) and _published_live(machine, machine_fd, name, st):
                continue
            if not stat.S_ISLNK(st.st_mode) and not (stat.S_ISSOCK(st.st_mode)
                                                     and not is_live_at(machine_fd, name)):
                continue  # (a file of root's: not npipe's to judge)
            if remove_if_same(machine_fd, name, st.st_ino):
                removed.append(machine / name)
    return removed


def _published_live(machine: Path, machine_fd: int, name: str, st: os.stat_result) -> bool:
    """Whether published ``name`` leads to a live socket in its holder's own directory."""
    target = published_socket(machine, machine / name, st.st_uid)
    if target is None:
        return False
    with opened_child_dir(machine_fd, target.parent.name) as user_fd:
        if user_fd is None or os.fstat(user_fd).st_uid != st.st_uid:
            return False
        return is_live_at(user_fd, target.name)


def _reclaim_tmp(uids: set[int] | None) -> list[Path]:
    """/tmp: private directories of servers whose paths would not fit in the pipe
    directory (and of older servers), and .NET-style sockets (/tmp/CoreFxPipe_NAME) of
    dead npipe servers."""
    removed: list[Path] = []
    tmp = Path("/tmp")
    dotnet_prefix = Path(DOTNET_PREFIX).name
    with opened_dir(tmp) as tmp_fd:
        if tmp_fd is None:
            return removed
        for name in os.listdir(tmp_fd):
            private = name.startswith(PRIVATE_DIR_PREFIXES)
            if not (private or name.startswith(dotnet_prefix)):
                continue
            st = lstat_at(tmp_fd, name)
            if st is None or (uids is not None and st.st_uid not in uids):
                continue
            if private:
                done = remove_private_dir_at(tmp_fd, name, st.st_uid)
            else:
                done = _remove_dead_socket_at(tmp_fd, name, st.st_uid)
            if done:
                removed.append(tmp / name)
    return removed


# A user's pipe directory in /tmp (its name: npipe-<uid>).
_PIPE_DIR_NAME = re.compile(r"npipe-[0-9]+\Z")
