"""Finding and checking a local pipe's socket before connecting to it."""

from __future__ import annotations

import errno
import functools
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from npipe.address import PipeAddress
from npipe.errors import AccessDenied, ConfigError, PipeBusy, PipeNotFound
from npipe.identity import user_name
from npipe.local.aclnote import admits
from npipe.local.listener import is_live, read_acl_note
from npipe.local.namespace import resolve, usable_machine_dir
from npipe.local.paths import candidate_paths, check_trusted_path, trusted_uids
from npipe.local.peercred import peer_credentials


def find_socket(
    addr: PipeAddress,
    *,
    server_user: str | int | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> Path:
    """The trusted socket path of a local pipe; PipeNotFound / AccessDenied otherwise.

    Looks among the machine-wide names (resolved to the socket in its holder's own
    directory: see npipe.local.namespace), then in this user's pipe directory, then at
    .NET's path; a pipe directory named by ``directory`` comes first (a private namespace).
    A default pipe directory that is not of a user the caller trusts (someone else made
    /tmp/npipe-<uid> first) is passed over, and so is a dead socket while a live one is
    found further on: neither may hide a live pipe. The path returned is what to dial,
    also for later re-dials (grpcio's).
    """
    trusted = trusted_uids(server_user)
    unreachable: list[Path] = []
    paths = candidate_paths(addr, directory=directory)
    machine = usable_machine_dir() if addr.kind == "local" else None
    looked = [*([machine / addr.key] if machine else []), *paths]

    def published() -> Path | None:
        if machine is None:
            return None
        try:
            return resolve(machine, addr.key, trusted)
        except AccessDenied:
            raise
        except PermissionError:  # the OS's: a directory on the way is closed to us
            unreachable.append(machine / addr.key)
            return None

    own: Callable[[], Path | None]
    own, *others = (functools.partial(_trusted_socket, p, trusted, unreachable) for p in paths)
    named = directory is not None or bool(os.environ.get("NPIPE_PIPE_DIR"))
    if addr.kind == "local" and not named and not _trusted_dir(paths[0].parent, trusted):
        own = _nothing  # (a directory named on purpose is checked, and refused, below)
    lookups: list[Callable[[], Path | None]] = (
        [own, published, *others] if directory is not None else [published, own, *others]
    )
    found = [path for lookup in lookups if (path := lookup()) is not None]
    if len(found) > 1:  # (probed only then: a probe is a connection its server sees)
        return next((path for path in found if is_live(path)), found[0])
    if found:
        return found[0]
    if unreachable:
        raise AccessDenied(
            f"no permission to reach pipe {addr} at {unreachable[0]}: a directory above it "
            "is closed to you"
        )
    where = " or ".join(str(p) for p in looked)
    raise PipeNotFound(f"no pipe {addr}: nothing at {where}; is its server running?")


def _nothing() -> None:
    return None


def _trusted_dir(directory: Path, trusted: set[int]) -> bool:
    """Whether a pipe directory is one of a trusted user's (not squatted by another)."""
    try:
        st = os.lstat(directory)
    except OSError:
        return True  # (missing or closed: the lookup in it says so)
    return stat.S_ISDIR(st.st_mode) and st.st_uid in trusted


def _trusted_socket(path: Path, trusted: set[int], unreachable: list[Path]) -> Path | None:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except PermissionError:
        unreachable.append(path)  # a live pipe may be behind a directory we cannot enter
        return None
    check_trusted_path(path, trusted)
    return path


def check_server(sock: socket.socket, path: Path, server_user: str | int | None) -> None:
    """Refuse a connected socket whose listener runs as a user the caller did not trust."""
    _pid, uid, _gid = peer_credentials(sock)
    if uid not in trusted_uids(server_user):
        raise AccessDenied(
            f"pipe {path} is served by {user_name(uid) or uid}, not by you or root: "
            "name the server user you expect (server_user=...) if you trust it"
        )


def check_admitted(sock: socket.socket, path: Path, pipe: object) -> None:
    """Refuse, before a byte is sent, a pipe whose ACL does not admit this process: the
    front door would close the connection without a word (what a crash looks like), so
    the ACL note that the connected server wrote beside its socket is asked first.

    Only a note that is surely the live server's own is believed (npipe.local.aclnote:
    owned by the listener's uid, naming the listener's pid and this socket's inode), and
    only once connect() succeeded: a dead server's socket fails to connect before any
    note is read, so a crash is never reported as a refusal. No such note: no prediction
    (the server decides, as before).
    """
    pid, uid, _gid = peer_credentials(sock)
    try:
        st = os.lstat(path)
    except OSError:
        return
    note = read_acl_note(path, uid)
    if note is None:
        return
    me, my_gid = os.geteuid(), os.getegid()
    verdict = admits(note, uid=me, gid=my_gid, groups=os.getgroups(), listener=(pid, uid),
                     socket=(st.st_ino, st.st_uid))
    if verdict is False:
        name = user_name(me)
        raise AccessDenied(
            f"access to pipe {pipe} is denied to {f'{name} (uid {me})' if name else f'uid {me}'}"
            f": its ACL does not admit you (it admits {note.text}; served by "
            f"{user_name(uid) or uid})"
        )


def connect_error(exc: OSError, path: Path, *, message: bool = False) -> Exception:
    """Turn a failed connect() into npipe's error for it (``message``: the caller
    dialled a message-mode pipe)."""
    if exc.errno == errno.EPROTOTYPE:  # a SOCK_STREAM dial of a SOCK_SEQPACKET one, or back
        if message:
            return ConfigError(f"pipe {path} is a byte-mode pipe, not a message-mode one: "
                               "open it with npipe.open_connection")
        return ConfigError(f"pipe {path} is a message-mode pipe: open it with "
                           "npipe.connection.Client")
    if isinstance(exc, ConnectionRefusedError):
        return PipeNotFound(f"pipe {path} has no server (a stale socket); is it running?")
    if isinstance(exc, FileNotFoundError):
        return PipeNotFound(f"pipe {path} went away")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"no permission to open pipe {path}")
    if isinstance(exc, BlockingIOError):
        return PipeBusy(f"pipe {path} is busy (its backlog is full); try again")
    return exc
