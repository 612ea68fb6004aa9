"""Where local pipes live on POSIX, and whether a path can be trusted.

A pipe NAME is a Unix socket ``<pipe dir>/<name in lower case>`` (names are
case-insensitive, as on Windows). The pipe directory is, in order:
``$NPIPE_PIPE_DIR``, ``$XDG_RUNTIME_DIR/npipe``, ``/tmp/npipe-<uid>``.
.NET's ``NamedPipeServerStream("NAME")`` listens on ``/tmp/CoreFxPipe_NAME`` on
Linux; ``dotnet=True`` uses that path instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from npipe.address import MAX_UNIX_PATH_BYTES, PipeAddress, parse_address
from npipe.errors import AccessDenied, AddressError, ConfigError
from npipe.identity import user_name

DOTNET_PREFIX = "/tmp/CoreFxPipe_"


def pipe_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The directory that holds this user's pipes (not created)."""
    if override:
        return Path(override)
    if env := os.environ.get("NPIPE_PIPE_DIR"):
        return Path(env)
    if (runtime := os.environ.get("XDG_RUNTIME_DIR")) and _owned_private_dir(Path(runtime)):
        return Path(runtime) / "npipe"
    return Path(f"/tmp/npipe-{os.getuid()}")


def ensure_pipe_dir(directory: Path, mode: int = 0o700) -> Path:
    """Create the pipe directory, or check that an existing one is ours and not writable by
    others: a directory that someone else made in /tmp could swap our sockets."""
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=False)
        os.chmod(directory, mode)  # mkdir's mode is cut by the umask
        return directory
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"pipe directory {directory} exists and is not a directory")
    if st.st_uid != os.getuid():
        who = user_name(st.st_uid) or st.st_uid
        raise AccessDenied(
            f"pipe directory {directory} was made by {who}, not by you ({who} may be "
            "squatting on it): ask root to remove it, or set XDG_RUNTIME_DIR or NPIPE_PIPE_DIR"
        )
    if st.st_mode & 0o022:
        raise AccessDenied(
            f"pipe directory {directory} is writable by others (mode {st.st_mode & 0o777:o}): "
            "chmod go-w it"
        )
    return directory


def socket_path(
    address: str | PipeAddress,
    *,
    directory: str | os.PathLike[str] | None = None,
    dotnet: bool = False,
) -> Path:
    """The socket path that serves a local pipe address (or a ``unix:`` one as given)."""
    addr = parse_address(address)
    if addr.kind == "unix":
        return Path(addr.path)
    if addr.kind != "local":
        raise AddressError(f"{addr} is a remote pipe; it has no local socket path")
    path = Path(DOTNET_PREFIX + addr.name) if dotnet else pipe_dir(directory) / addr.key
    check_socket_path(path)
    return path


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
        raise AddressError(
            f"socket path {path} is longer than {MAX_UNIX_PATH_BYTES} bytes: "
            "use a shorter pipe name or NPIPE_PIPE_DIR"
        )


def candidate_paths(
    address: str | PipeAddress, *, directory: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Where a client looks for a local pipe: the pipe directory, then .NET's path
    (the machine-wide names come between, see :mod:`npipe.local.namespace`)."""
    addr = parse_address(address)
    if addr.kind == "unix":
        return [Path(addr.path)]
    return [socket_path(addr, directory=directory), socket_path(addr, dotnet=True)]


def check_trusted_path(path: Path, trusted_uids: set[int]) -> None:
    """Refuse a socket that someone outside ``trusted_uids`` could have put or swapped there.

    The socket file must belong to a trusted user, and so must every directory above it
    unless the directory is writable by its owner only or sticky (as /tmp is: there only a
    file's owner may remove or rename it). This is what stops a squatter on a pipe name.
    The path is walked component by component with lstat: a symbolic link on the way is
    followed only if root or a trusted user made it, and its target is walked the same way.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise AccessDenied(f"{path} is a symbolic link; npipe connects to sockets only")
    if not stat.S_ISSOCK(st.st_mode):
        raise AccessDenied(f"{path} is not a socket")
    if st.st_uid not in trusted_uids:
        raise AccessDenied(
            f"pipe {path} is served by {user_name(st.st_uid) or st.st_uid}, not by you or "
            "root: name the server user you expect (server_user=...) if you trust it"
        )
    check_trusted_dirs(Path(os.path.abspath(path)).parent, trusted_uids | {0}, path)


# How many symbolic links a trusted path may pass through (the kernel allows 40).
MAX_LINKS = 40


def check_trusted_dirs(directory: Path, trusted: set[int], what: object) -> None:
    """Every component of ``directory`` (absolute), walked with lstat from the root:
    owned by a trusted user and not writable by others unless sticky; a symbolic link
    counts as its owner's word and is followed (its target walked in turn)."""
    pending = list(directory.parts[1:])
    current = Path(directory.anchor or "/")
    links = 0
    _check_dir_entry(current, os.lstat(current), trusted, what)
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        st = os.lstat(candidate)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if st.st_uid not in trusted or links > MAX_LINKS:
                raise AccessDenied(
                    f"{candidate} (above pipe {what}) is a symbolic link that "
                    f"{user_name(st.st_uid) or st.st_uid} made; npipe does not follow it"
                )
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path(target.anchor)
                _check_dir_entry(current, os.lstat(current), trusted, what)
            pending[:0] = list(target.parts[1:] if target.is_absolute() else target.parts)
            continue
        _check_dir_entry(candidate, st, trusted, what)
        current = candidate


def _check_dir_entry(path: Path, st: os.stat_result, trusted: set[int], what: object) -> None:
    writable_by_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    if not stat.S_ISDIR(st.st_mode):
        raise AccessDenied(f"{path} (above pipe {what}) is not a directory")
    if st.st_uid not in trusted or writable_by_others:
        raise AccessDenied(
            f"{path} (above pipe {what}) can be changed by other users; "
            "npipe does not trust sockets there"
        )


def trusted_uids(server_user: str | int | None) -> set[int]:
    """The users whose pipes a client accepts: itself, root and the one it names."""
    uids = {os.getuid(), 0}
    if server_user is not None:
        if isinstance(server_user, int):
            uids.add(server_user)
        else:
            import pwd

            try:
                uids.add(pwd.getpwnam(server_user).pw_uid)
            except KeyError:
                raise ConfigError(f"unknown server user {server_user!r}") from None
    return uids


def _owned_private_dir(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
