"""What ``npipe ls`` shows: the pipes a user can find, where they are and who holds them."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from npipe.identity import user_name
from npipe.local.dirfd import GONE_PREFIX
from npipe.local.listener import NOTE_PREFIX, TEMP_PREFIX, is_live, read_note
from npipe.local.namespace import published_socket, usable_machine_dir, user_dir_owner
from npipe.local.paths import DOTNET_PREFIX, pipe_dir


@dataclass(frozen=True)
class PipeEntry:
    name: str
    state: str  # live | stale | invalid (a name that does not lead where npipe puts sockets)
    owner: str
    admits: str  # who the ACL admits, as its server noted it ("?" where unknown)
    path: Path  # the name as found (a machine-wide name shows "name -> socket")
    where: str  # own | machine | dotnet
    socket: Path | None = None  # the socket the name leads to (what to dial), if known


def list_pipes(directory: str | os.PathLike[str] | None = None) -> list[PipeEntry]:
    rows: list[PipeEntry] = []
    own = pipe_dir(directory)
    for path in _sockets(own):
        if not path.name.startswith("."):
            rows.append(_entry(path.name, path, path, "own"))
    machine = usable_machine_dir()
    if machine is not None:
        for name in _entries(machine):
            if user_dir_owner(name.name) is not None or name.name.startswith(GONE_PREFIX):
                continue
            try:
                st = os.lstat(name)
                target = Path(os.readlink(name))
            except OSError:
                continue
            if published_socket(machine, name, st.st_uid) is None:
                # Not where npipe puts sockets: never probed, never dialled by clients.
                rows.append(PipeEntry(name.name, "invalid", _owner(name), "?",
                                      Path(f"{name} -> {target}"), "machine", None))
                continue
            rows.append(_entry(name.name, name, target, "machine"))
    tmp = Path(DOTNET_PREFIX).parent
    for path in _sockets(tmp):
        if os.fspath(path).startswith(DOTNET_PREFIX):
            rows.append(_entry(path.name[len(Path(DOTNET_PREFIX).name):], path, path, "dotnet"))
    return sorted(rows, key=lambda r: (r.name, r.where))


def _entry(name: str, path: Path, socket_path: Path, where: str) -> PipeEntry:
    try:
        owner_uid: int | None = os.lstat(path).st_uid
    except OSError:
        owner_uid = None
    shown = path if socket_path == path else Path(f"{path} -> {socket_path}")
    admits = read_note(socket_path, owner_uid) or ("?" if where != "dotnet" else "(.NET)")
    return PipeEntry(name, "live" if is_live(socket_path) else "stale", _owner(path), admits,
                     shown, where, socket_path)


def _owner(path: Path) -> str:
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return "?"
    return user_name(uid) or str(uid)


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _sockets(directory: Path) -> list[Path]:
    found = []
    for p in _entries(directory):
        if p.name.startswith((NOTE_PREFIX, TEMP_PREFIX)):
            continue
        try:
            if stat.S_ISSOCK(os.lstat(p).st_mode):
                found.append(p)
        except OSError:
            continue
    return found
