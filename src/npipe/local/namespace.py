"""One pipe namespace for the whole machine, as on Windows.

On Windows ``\\\\.\\pipe\\NAME`` is one name for every account on the machine and the
pipe's DACL decides who gets in. Here:

- **Owner-only pipes** stay in their owner's private pipe directory (see
  :mod:`npipe.local.paths`): nobody else could open them anyway.
- **Pipes that admit others** are published in the machine-wide directory
  ``/run/npipe`` (``$NPIPE_MACHINE_DIR``): root-owned and sticky (mode 1777, as /tmp),
  made by ``npipe setup`` as root or by systemd-tmpfiles (``packaging/npipe.tmpfiles``),
  and by any server that runs as root. Sticky means only an entry's owner (or root) can
  remove or rename it, so nobody can take over a name that another user holds.

Each published name ``/run/npipe/<key>`` is a symbolic link, owned by the serving user,
to that user's socket in ``/run/npipe/.u<uid>/<key>``: a directory that only that user
can write and, in a sticky directory, only that user or root can remove (npipe never
does). A client resolves the link once, checks that the link, the directory and the
socket all belong to one user it trusts, and dials the resolved socket path. grpcio's
silent re-dials after a server restart therefore reach only a socket that same user
made: a squatter who takes the name meanwhile gets nothing from the clients of the real
service. The first server to publish a live name wins, whichever user it runs as
(:class:`PipeInUse` for the next); a stale name is replaced only by its owner or root.

Without a usable machine-wide directory (not made yet, not root's, not sticky), a pipe
that admits others is served in its owner's pipe directory only, as before, with a
warning: its clients must then name that directory (``pipe_dir=``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from npipe.errors import AccessDenied, AddressError, PipeInUse
from npipe.identity import user_name
from npipe.local.dirfd import GONE_PREFIX, opened_dir, remove_if_same

log = logging.getLogger("npipe.namespace")

# macOS has no /run: /var/run is its root-owned directory emptied at boot.
DEFAULT_MACHINE_DIR = Path("/var/run/npipe" if sys.platform == "darwin" else "/run/npipe")
ENV_MACHINE_DIR = "NPIPE_MACHINE_DIR"
MACHINE_DIR_MODE = 0o1777
# A user's directory of published sockets: others may reach a socket by name, not list.
USER_DIR_MODE = 0o711
USER_DIR_PREFIX = ".u"

# (socket path) -> whether a server accepts connections there
LiveCheck = Callable[[Path], bool]


def machine_dir() -> Path:
    """Where machine-wide names live (not checked; see :func:`usable_machine_dir`)."""
    return Path(os.environ.get(ENV_MACHINE_DIR) or DEFAULT_MACHINE_DIR)


def usable_machine_dir(*, create: bool = False) -> Path | None:
    """The machine-wide directory if it can be trusted: a real directory owned by root
    with the sticky bit. Root may ``create`` it; None if it is missing or not trusted."""
    directory = machine_dir()
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        if not (create and os.geteuid() == 0):
            return None
        make_machine_dir(directory)
        return directory
    except OSError:
        return None
    if not trusted_machine_dir(st):
        log.warning(
            "%s is not a root-owned sticky directory (uid %s, mode %o): not using it for "
            "machine-wide pipe names", directory, st.st_uid, stat.S_IMODE(st.st_mode),
        )
        return None
    return directory


def trusted_machine_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and bool(st.st_mode & stat.S_ISVTX)


def make_machine_dir(directory: Path | None = None) -> Path:
    """Create the machine-wide directory as root (what ``npipe setup`` does)."""
    directory = directory or machine_dir()
    parent = directory.parent
    parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)  # opened up below, once it is surely ours
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise AccessDenied(f"{directory} exists and is not root's directory: remove it first")
    os.chmod(directory, MACHINE_DIR_MODE)
    return directory


def user_dir(machine: Path, uid: int) -> Path:
    """The directory of ``uid``'s published sockets inside the machine-wide directory."""
    return machine / f"{USER_DIR_PREFIX}{uid}"


def ensure_user_dir(machine: Path) -> Path:
    """Create (or check) this user's directory of published sockets.

    Anyone can create ``.u<uid>`` in the sticky machine-wide directory before that user's
    first server (and again after every boot: /run is a tmpfs), and nobody but root can
    then remove it. Such a squat must not stop the user: the server then uses a directory
    of its own with a random suffix (``.u<uid>-XXXXXXXX``), which clients accept as that
    user's as well, and says once who squats the usual one.
    """
    uid = os.geteuid()
    directory = user_dir(machine, uid)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, USER_DIR_MODE)
        os.chmod(directory, USER_DIR_MODE)  # mkdir's mode is cut by the umask
    try:
        check_user_dir(directory, uid)
        return directory
    except AccessDenied as e:
        squatted = e
    for other in sorted(own_user_dirs(machine, uid)):
        if other != directory:
            return other
    fresh = Path(tempfile.mkdtemp(prefix=f"{directory.name}-", dir=machine))
    os.chmod(fresh, USER_DIR_MODE)
    log.warning("%s; serving from %s instead", squatted, fresh)
    return fresh


def own_user_dirs(machine: Path, uid: int) -> list[Path]:
    """``uid``'s directories of published sockets that are really its own (the usual one
    and those made beside a squatted one)."""
    found: list[Path] = []
    try:
        names = os.listdir(machine)
    except OSError:
        return found
    for name in names:
        if user_dir_owner(name) == uid:
            with contextlib.suppress(OSError, AccessDenied):
                check_user_dir(machine / name, uid)
                found.append(machine / name)
    return found


_USER_DIR_NAME = re.compile(rf"{re.escape(USER_DIR_PREFIX)}([0-9]+)(?:-[a-z0-9_]+)?\Z")


def user_dir_owner(name: str) -> int | None:
    """The uid whose directory of published sockets ``name`` is named as, or None."""
    m = _USER_DIR_NAME.match(name)
    return int(m.group(1)) if m else None


def check_user_dir(directory: Path, uid: int) -> None:
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        owner = user_name(st.st_uid) or st.st_uid
        raise AccessDenied(
            f"{directory} is not a directory of uid {uid}'s own (it belongs to {owner}, mode "
            f"{stat.S_IMODE(st.st_mode):o}): {owner} may be squatting on it (root can "
            "remove it)"
        )


def published_name(machine: Path, key: str) -> Path:
    if user_dir_owner(key) is not None or key.startswith(GONE_PREFIX):
        raise AddressError(f"pipe name {key!r} is reserved for npipe's own entries")
    return machine / key


def publish(machine: Path, key: str, socket_path: Path, *, is_live: LiveCheck) -> Path:
    """Point the machine-wide name ``key`` at ``socket_path`` (a live socket of ours).

    The link is made atomically (symlink() fails if the name exists), so of two servers
    racing for a name exactly one wins. A name held by a live server gives PipeInUse,
    whoever serves it; a stale one is replaced only if it is ours (or we are root).
    """
    name = published_name(machine, key)
    for _ in range(3):
        try:
            os.symlink(socket_path, name)
            return name
        except FileExistsError:
            pass
        _remove_if_stale(name, socket_path, is_live)
    raise PipeInUse(f"pipe {key} was claimed by another server just now")


def _remove_if_stale(name: Path, ours: Path, is_live: LiveCheck) -> None:
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return
    holder = user_name(st.st_uid) or st.st_uid
    target = _target(name)
    if st.st_uid == os.geteuid() and target == ours:
        # Left by a dead server of ours at the very socket path we now hold (the claim
        # of that path replaced its stale socket under the name's lock): ours to replace.
        remove_entry(name, st.st_ino)
        return
    if target is None or is_live(target):
        raise PipeInUse(f"pipe {name.name} is already served by a live server (of {holder})")
    if st.st_uid not in (os.geteuid(), 0) and os.geteuid() != 0:
        raise PipeInUse(
            f"pipe {name.name} is held by {holder}'s server, which is gone: only {holder} or "
            "root can remove the name (npipe ls --prune)"
        )
    remove_entry(name, st.st_ino)


def remove_entry(name: Path, ino: int) -> bool:
    """Unlink ``name`` if it is still the entry we looked at (inode ``ino``), through a
    descriptor of its directory reached without following links (npipe.local.dirfd)."""
    with opened_dir(name.parent) as dir_fd:
        return dir_fd is not None and remove_if_same(dir_fd, name.name, ino)


def published_socket(machine: Path, name: Path, holder: int) -> Path | None:
    """Where published ``name`` (a link of ``holder``'s) points, if that is where npipe
    puts sockets: ``<machine>/.u<holder>[-XXXX]/<the same name>``; None otherwise."""
    target = _target(name)
    if (target is None or target.name != name.name or target.parent.parent != machine
            or user_dir_owner(target.parent.name) != holder):
        return None
    return target


def _target(name: Path) -> Path | None:
    """Where a published name points (None for an entry that is not a link: root's socket
    or anything else, which is then treated as live and never replaced)."""
    try:
        return Path(os.readlink(name))
    except OSError:
        return None


def resolve(machine: Path, key: str, trusted: set[int]) -> Path | None:
    """The socket behind machine-wide name ``key``, if a user in ``trusted`` holds it.

    None if the name does not exist; AccessDenied if it is held by someone else or is not
    laid out as npipe publishes it (link -> the holder's own directory -> the holder's
    socket), so nothing planted there is ever dialled.
    """
    try:
        name = published_name(machine, key)
        st = os.lstat(name)
    except (FileNotFoundError, AddressError):
        return None
    holder = st.st_uid
    who = user_name(holder) or holder
    if holder not in trusted:
        raise AccessDenied(
            f"pipe {key} is served by {who}, not by you or root: name the server user you "
            "expect (server_user=...) if you trust it"
        )
    if not stat.S_ISLNK(st.st_mode):
        raise AccessDenied(f"{name} is not a name npipe published (not a link): not trusted")
    expected = published_socket(machine, name, holder)
    if expected is None:
        raise AccessDenied(f"{name} (of {who}) points outside {who}'s pipe directory")
    check_user_dir(expected.parent, holder)
    try:
        sst = os.lstat(expected)
    except FileNotFoundError:
        return expected  # a stale name: connecting reports "no server"
    if not stat.S_ISSOCK(sst.st_mode) or sst.st_uid != holder:
        raise AccessDenied(f"{expected} is not a socket of {who}'s: not trusted")
    return expected


# --- root-made per-user directories (for sockets that root's processes dial) -----------
#
# smbd (root) follows np/NAME links to a non-root user's socket. Such a link may point
# only where no other user can ever create the target: a directory that root made for
# that user, in a parent that only root can write (so the user cannot lose it to anyone
# either: not even its owner can remove it). npipe.samba's non-root servers listen there.

ROOT_MADE_PARENT = "npipe-smb"


def root_made_parent() -> Path:
    """``/run/npipe-smb`` (beside the machine-wide directory; root's, 0755)."""
    return machine_dir().parent / ROOT_MADE_PARENT


def root_made_user_dir(uid: int) -> Path:
    return root_made_parent() / str(uid)


def make_root_made_user_dir(uid: int, gid: int) -> Path:
    """As root: create (or check) ``uid``'s directory, 0700, in the root-only parent."""
    parent = root_made_parent()
    parent.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(parent, 0o755)
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise AccessDenied(f"{parent} is not a root-only directory: remove it first")
    directory = parent / str(uid)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
        os.chown(directory, uid, gid)
    check_root_made_user_dir(uid)
    return directory


def check_root_made_user_dir(uid: int) -> Path:
    """``uid``'s root-made directory, if it is exactly as root makes it; AccessDenied or
    FileNotFoundError otherwise."""
    directory = root_made_user_dir(uid)
    parent = os.lstat(directory.parent)
    if not stat.S_ISDIR(parent.st_mode) or parent.st_uid != 0 or parent.st_mode & 0o022:
        raise AccessDenied(f"{directory.parent} is not a root-only directory")
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) != 0o700:
        raise AccessDenied(f"{directory} is not uid {uid}'s 0700 directory as root made it")
    return directory
