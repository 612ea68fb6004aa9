"""Finding and checking a local pipe's socket before connecting to it."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path

from npipe.address import PipeAddress
from npipe.errors import AccessDenied, PipeBusy, PipeNotFound
from npipe.identity import user_name
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

    Looks in this user's pipe directory, then among the machine-wide names (resolved to
    the socket in its holder's own directory: see npipe.local.namespace), then at .NET's
    path. The path returned is what to dial, also for later re-dials (grpcio's).
    """
    trusted = trusted_uids(server_user)
    unreachable: list[Path] = []
    paths = candidate_paths(addr, directory=directory)
    machine = usable_machine_dir() if addr.kind == "local" else None
    looked = [*paths[:1], *([machine / addr.key] if machine else []), *paths[1:]]

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

    own, *others = (functools.partial(_trusted_socket, p, trusted, unreachable) for p in paths)
    lookups: list[Callable[[], Path | None]] = [own, published, *others]
    for found in lookups:
        if (path := found()) is not None:
            return path
    if unreachable:
        raise AccessDenied(
            f"no permission to reach pipe {addr} at {unreachable[0]}: a directory above it "
            "is closed to you"
        )
    where = " or ".join(str(p) for p in looked)
    raise PipeNotFound(f"no pipe {addr}: nothing at {where}; is its server running?")


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


def connect_error(exc: OSError, path: Path) -> Exception:
    """Turn a failed connect() into npipe's error for it."""
    if isinstance(exc, ConnectionRefusedError):
        return PipeNotFound(f"pipe {path} has no server (a stale socket); is it running?")
    if isinstance(exc, FileNotFoundError):
        return PipeNotFound(f"pipe {path} went away")
    if isinstance(exc, PermissionError):
        return AccessDenied(f"no permission to open pipe {path}")
    if isinstance(exc, BlockingIOError):
        return PipeBusy(f"pipe {path} is busy (its backlog is full); try again")
    return exc
