"""Reclaiming what killed servers left behind: stale sockets, names, private directories.

A server that exits cleanly removes what it made. One that is killed (SIGKILL, a crash,
the OOM killer) cannot, so every server, when it starts, removes what dead servers of the
same user left, and ``npipe ls --prune`` does the same on demand (as root: for every
user). Something is removed only once it is proven dead on two counts: no process with
the recorded pid and start time (pids are reused: the start time tells them apart), and
nothing accepting on its socket. Removal of a name happens under that name's lock, the
same one a server holds while it claims the name, so a new server that takes a stale
name at the same moment never loses its fresh socket. A live server's files, and another
user's (unless root prunes), are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from npipe.local.listener import (
    LOCK_PREFIX,
    NOTE_PREFIX,
    PRIVATE_DIR_PREFIXES,
    is_live,
    locked,
    read_record,
    record_alive,
    remove_private_dir,
)
from npipe.local.namespace import (
    USER_DIR_PREFIX,
    remove_entry,
    usable_machine_dir,
    user_dir,
)
from npipe.local.paths import DOTNET_PREFIX, pipe_dir

log = logging.getLogger("npipe.reclaim")


def reclaim(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove what this user's dead servers left; returns what was removed.

    Looks in the pipe directory (``directory`` or the default), this user's directory
    of machine-wide sockets and the names that point into it, and /tmp (private
    directories of older servers, .NET-style sockets).
    """
    uid = os.geteuid()
    removed: list[Path] = []
    machine = usable_machine_dir()
    dirs = [pipe_dir(directory)]
    if machine is not None:
        dirs.append(user_dir(machine, uid))
    for d in dirs:
        removed += _reclaim_pipe_dir(d, uid)
    if machine is not None:
        removed += _reclaim_names(machine, {uid})
    removed += _reclaim_tmp({uid})
    return removed


def reclaim_all() -> list[Path]:
    """As root: the same for every user, wherever npipe puts pipes."""
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
    yield from _entries(Path("/tmp"), lambda p: p.name.startswith("npipe-")
                        and p.name[len("npipe-"):].isdigit())
    yield from (p / "npipe" for p in _entries(Path("/run/user"), lambda p: True))
    if machine is not None:
        yield from _entries(machine, lambda p: p.name.startswith(USER_DIR_PREFIX))
    env = os.environ.get("NPIPE_PIPE_DIR")
    if env:
        yield Path(env)


def _entries(directory: Path, keep: object) -> list[Path]:
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    return [p for p in entries if keep(p)]  # type: ignore[operator]


def _reclaim_pipe_dir(directory: Path, uid: int) -> list[Path]:
    """One user's pipe directory: recorded names first (under their locks), then sockets
    and private directories that no record names."""
    removed: list[Path] = []
    try:
        st = os.lstat(directory)
        entries = list(directory.iterdir())
    except OSError:
        return removed
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        return removed
    live: set[Path] = set()  # sockets of servers that still run: not even probed
    for lock_file in (p for p in entries if p.name.startswith(LOCK_PREFIX)):
        removed += _reclaim_recorded(lock_file, uid, live)
    for entry in entries:
        if entry.name.startswith(LOCK_PREFIX) or entry in live:
            continue
        if entry.name.startswith(PRIVATE_DIR_PREFIXES):
            if remove_private_dir(entry, uid):
                removed.append(entry)
        elif _remove_dead_socket(entry, uid):
            removed.append(entry)
    for note in (p for p in entries if p.name.startswith(NOTE_PREFIX)):
        if not os.path.lexists(directory / note.name[len(NOTE_PREFIX):]):
            with contextlib.suppress(OSError):
                os.unlink(note)
                removed.append(note)
    return removed


def _reclaim_recorded(lock_file: Path, uid: int, live: set[Path]) -> list[Path]:
    removed: list[Path] = []
    with locked(lock_file, create=False) as lock_fd:
        if lock_fd is None or os.fstat(lock_fd).st_uid != uid:
            return removed
        record = read_record(lock_fd)
        if record_alive(record):
            if record.get("path"):
                live.add(Path(record["path"]))
            return removed
        path = Path(record["path"]) if record.get("path") else None
        if path is not None and os.path.lexists(path):
            if not _remove_dead_socket(path, uid):
                return removed  # alive after all (another process took the name): keep
            removed.append(path)
        if record.get("private") and remove_private_dir(Path(record["private"]), uid):
            removed.append(Path(record["private"]))
        os.unlink(lock_file)  # under its lock: see npipe.local.listener.locked
        removed.append(lock_file)
    return removed


def _remove_dead_socket(path: Path, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid or is_live(path):
        return False
    return remove_entry(path, st.st_ino)


def _reclaim_names(machine: Path, uids: set[int] | None) -> list[Path]:
    """Machine-wide names (links) of ``uids`` (None: anyone's) whose socket is gone."""
    removed = []
    for name in _entries(machine, lambda p: not p.name.startswith(USER_DIR_PREFIX)):
        try:
            st = os.lstat(name)
            target = os.readlink(name)
        except OSError:
            continue
        if uids is not None and st.st_uid not in uids:
            continue
        if not is_live(Path(target)) and remove_entry(name, st.st_ino):
            removed.append(name)
    return removed


def _reclaim_tmp(uids: set[int] | None) -> list[Path]:
    """/tmp: private directories of servers from before they moved into the pipe
    directory, and .NET-style sockets (/tmp/CoreFxPipe_NAME) of dead npipe servers."""
    removed = []
    tmp = Path("/tmp")
    for entry in _entries(tmp, lambda p: p.name.startswith(PRIVATE_DIR_PREFIXES[0])):
        with contextlib.suppress(OSError):
            owner = os.lstat(entry).st_uid
            if (uids is None or owner in uids) and remove_private_dir(entry, owner):
                removed.append(entry)
    dotnet_prefix = Path(DOTNET_PREFIX).name
    for entry in _entries(tmp, lambda p: p.name.startswith(dotnet_prefix)):
        with contextlib.suppress(OSError):
            owner = os.lstat(entry).st_uid
            if (uids is None or owner in uids) and _remove_dead_socket(entry, owner):
                removed.append(entry)
    return removed
