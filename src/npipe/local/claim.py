"""Claiming a local pipe's name for a server: where its socket goes, and publishing it.

Every pipe is published machine-wide (npipe.local.namespace), whatever its ACL: one
name for the whole machine, as on Windows. Before it claims a name, a server reclaims
what dead servers of the same user left behind (npipe.local.reclaim).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress
from npipe.identity import group_name, user_name
from npipe.local import reclaim
from npipe.local.aclnote import build_note
from npipe.local.listener import (
    ClaimedPath,
    ClaimedSocket,
    claim,
    claim_existing,
    is_live,
    write_note,
)
from npipe.local.namespace import ensure_user_dir, machine_dir, publish, usable_machine_dir
from npipe.local.paths import check_socket_path, pipe_dir, socket_path

log = logging.getLogger("npipe.claim")


@dataclass(frozen=True)
class Place:
    """Where a server's pipe goes: its socket ``path``, the pipe directory that holds the
    name's lock (``lock_dir``), and the machine-wide directory it is published in."""

    path: Path
    lock_dir: Path
    machine: Path | None


def place_for(
    addr: PipeAddress,
    *,
    directory: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
) -> Place:
    """Where a server of ``addr`` listens, after reclaiming what dead servers left.

    Every pipe, whatever its ACL, is one name for the whole machine (as on Windows): its
    socket goes in this user's own directory inside the machine-wide one and is published
    there, so no other user (root included) can serve the same name meanwhile. Only an
    explicit ``directory`` (a private namespace its clients name too), .NET's path, or a
    machine without the machine-wide directory keep it in a pipe directory.
    """
    lock_dir = pipe_dir(directory)
    reclaim.quietly(directory)
    machine = None
    if addr.kind == "local" and not (dotnet or directory is not None):
        machine = usable_machine_dir(create=True)
        if machine is None:
            _warn_no_machine_dir(lock_dir)
    if machine is not None:
        path = ensure_user_dir(machine) / addr.key
        check_socket_path(path)
    else:
        path = socket_path(addr, directory=directory, dotnet=dotnet)
    return Place(path, lock_dir, machine)


def claim_pipe(
    addr: PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    directory: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
    private: Path | None = None,
    place: Place | None = None,
    sock_type: int = socket.SOCK_STREAM,
) -> ClaimedSocket:
    """Bind the public socket of a local pipe (at ``place``: see :func:`place_for`), open
    to others only if ``acl`` admits more than the owner (the ACL itself is checked per
    connection). ``sock_type``: SOCK_SEQPACKET for a message-mode pipe."""
    place = place or place_for(addr, directory=directory, dotnet=dotnet)
    mode = 0o600 if acl == OWNER_ONLY else 0o666
    claimed = claim(place.path, place.lock_dir, mode=mode, private=private,
                    sock_type=sock_type)
    _finish(claimed, place, acl, addr, dotnet=dotnet)
    return claimed


def claim_pipe_existing(
    socket: Path, addr: PipeAddress, place: Place, *, dotnet: bool = False,
    private: Path | None = None,
) -> ClaimedPath:
    """Give an owner-only pipe's name to a socket that someone else (grpcio) listens on:
    hard-linked in place, so it must be on the same file system as ``place.path``."""
    claimed = claim_existing(socket, place.path, place.lock_dir, mode=0o600, private=private)
    _finish(claimed, place, OWNER_ONLY, addr, dotnet=dotnet)
    return claimed


def _finish(claimed: ClaimedPath, place: Place, acl: Acl, addr: PipeAddress, *,
            dotnet: bool) -> None:
    """The ACL note for ``npipe ls``, and the machine-wide name (or, in a pipe directory,
    the mode that lets others reach a socket they are admitted to)."""
    owner_only = acl == OWNER_ONLY
    try:
        if place.machine is not None:
            claimed.note = write_note(place.path, _note(acl, claimed), 0o644)
            claimed.published = publish(place.machine, addr.key, place.path, is_live=is_live)
        elif not dotnet:
            claimed.note = write_note(place.path, _note(acl, claimed),
                                      0o600 if owner_only else 0o644)
            if not owner_only and place.path.parent == place.lock_dir:
                os.chmod(place.lock_dir, 0o711)  # others may reach this socket, not list
    except BaseException:
        claimed.release()
        raise


_warned: set[Path] = set()


def _warn_no_machine_dir(lock_dir: Path) -> None:
    """Once per process: the one-name guarantee does not hold on this machine."""
    if lock_dir in _warned:
        return
    _warned.add(lock_dir)
    log.warning(
        "no machine-wide pipe directory (%s, root's, mode 1777; `npipe setup` as root "
        "makes it): pipe names are this user's only (in %s), other users can serve the "
        "same names and find these pipes only by naming that directory", machine_dir(),
        lock_dir,
    )


def _note(acl: Acl, claimed: ClaimedPath) -> bytes:
    """The ACL note of a socket this process listens on (npipe.local.aclnote)."""
    return build_note(acl, describe_acl(acl), owner=os.getuid(), pid=os.getpid(),
                      socket=claimed.inode)


def describe_acl(acl: Acl) -> str:
    """Who a pipe admits, in words, for ``npipe ls``."""
    if acl.everyone:
        return "everyone"
    who = ["owner"]
    who += [f"user:{user_name(uid) or uid}" for uid in sorted(acl.uids)]
    who += [f"group:{group_name(gid) or gid}" for gid in sorted(acl.gids)]
    who += [f"user:{name}" for name in sorted(acl.accounts | acl.upns)]
    who += [f"sid:{sid}" for sid in sorted(acl.sids)]
    return ",".join(who)

