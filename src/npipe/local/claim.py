"""Claiming a local pipe's name for a server: where its socket goes, and publishing it.

Owner-only pipes are served in their owner's pipe directory; pipes that admit others
are published machine-wide (npipe.local.namespace). Before it claims a name, a server
reclaims what dead servers of the same user left behind (npipe.local.reclaim).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from npipe.acl import OWNER_ONLY, Acl
from npipe.address import PipeAddress
from npipe.identity import group_name, user_name
from npipe.local import reclaim
from npipe.local.listener import ClaimedSocket, claim, is_live, write_note
from npipe.local.namespace import ensure_user_dir, machine_dir, publish, usable_machine_dir
from npipe.local.paths import check_socket_path, pipe_dir, socket_path

log = logging.getLogger("npipe.claim")


def claim_pipe(
    addr: PipeAddress,
    *,
    acl: Acl = OWNER_ONLY,
    directory: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
    private: Path | None = None,
) -> ClaimedSocket:
    """Bind the public socket of a local pipe, open to others only if ``acl`` admits more
    than the owner (the ACL itself is checked per connection).

    A pipe that admits others is published under its name in the machine-wide directory
    (npipe.local.namespace), unless ``directory`` names a pipe directory of its own: then
    it is served there only, as in a private namespace that its clients name too.
    """
    owner_only = acl == OWNER_ONLY
    mode = 0o600 if owner_only else 0o666
    lock_dir = pipe_dir(directory)
    reclaim.quietly(directory)
    machine = None
    if not (owner_only or dotnet or directory is not None):
        machine = usable_machine_dir(create=True)
        if machine is None:
            log.warning(
                "pipe %s admits other users, but there is no machine-wide pipe directory "
                "(%s, root's, mode 1777): they find it only by naming the pipe directory "
                "%s; create it once as root with `npipe setup`", addr.name, machine_dir(),
                lock_dir,
            )
    if machine is not None:
        path = ensure_user_dir(machine) / addr.key
        check_socket_path(path)
        claimed = claim(path, lock_dir, mode=mode, private=private)
        try:
            claimed.note = write_note(path, describe_acl(acl), 0o644)
            claimed.published = publish(machine, addr.key, path, is_live=is_live)
        except BaseException:
            claimed.release()
            raise
        return claimed
    path = socket_path(addr, directory=directory, dotnet=dotnet)
    claimed = claim(path, lock_dir, mode=mode, private=private)
    if not dotnet:
        claimed.note = write_note(path, describe_acl(acl), 0o600 if owner_only else 0o644)
    if mode != 0o600 and path.parent == lock_dir:
        os.chmod(lock_dir, 0o711)  # others may traverse to this socket, not list the pipes
    return claimed


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

