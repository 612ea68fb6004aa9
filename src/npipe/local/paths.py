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
        raise AccessDenied(
            f"pipe directory {directory} belongs to {user_name(st.st_uid) or st.st_uid}, "
            "not to you: remove it or set NPIPE_PIPE_DIR"
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
    if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
        raise AddressError(
            f"socket path {path} is longer than {MAX_UNIX_PATH_BYTES} bytes: "
            "use a shorter pipe name or NPIPE_PIPE_DIR"
        )
    return path


def candidate_paths(
    address: str | PipeAddress, *, directory: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Where a client looks for a local pipe: the pipe directory, then .NET's path."""
    addr = parse_address(address)
    if addr.kind == "unix":
        return [Path(addr.path)]
    return [socket_path(addr, directory=directory), socket_path(addr, dotnet=True)]


def check_trusted_path(path: Path, trusted_uids: set[int]) -> None:
    """Refuse a socket that someone outside ``trusted_uids`` could have put or swapped there.

    The socket file must belong to a trusted user, and so must every directory above it
    unless the directory is writable by its owner only or sticky (as /tmp is: there only a
    file's owner may remove or rename it). This is what stops a squatter on a pipe name.
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
    for parent in path.resolve().parents:
        pst = os.stat(parent)
        writable_by_others = pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX
        if pst.st_uid not in trusted_uids | {0} or writable_by_others:
            raise AccessDenied(
                f"{parent} (above pipe {path}) can be changed by other users; "
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
