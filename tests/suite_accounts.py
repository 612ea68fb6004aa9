"""The Unix accounts the test suite creates, and their removal when the suite ends.

Tests that run clients and servers as other users create the accounts they need when
missing (``useradd -M``): npipe-t1..3 (grpc_support.ensure_test_users) and the SMB
tests' npt-*, npth-* and npipe-smb1 (npipe.samba.smbd.ensure_unix_user, also called in
subprocesses). Both append the name of an account they created to the file named by
``$NPIPE_TEST_ACCOUNTS_FILE``, which conftest's session fixture sets (children inherit
it); an account that existed already is not written there, and is never removed.

Several test sessions may run on one machine at once and share the accounts (one
creates npipe-t1, another finds it and uses it). So each session holds a shared lock on
``STATE_DIR/lock`` while it runs and keeps its registry, ``session-*``, in STATE_DIR.
When it ends it tries to take that lock exclusively: if it can, no other session is
running, and it removes the accounts of every registry there (its own, those of sessions
that ended while others ran, and those of sessions that were killed), then the registries;
if it cannot, it leaves its registry to the last session that ends.

Removing an account: the processes still running as it are killed only if userdel says
it is in use; the entries it owns at the top of /tmp, /var/tmp, /dev/shm, /run and
/run/user (/tmp/npipe-<uid>: its pipe directory) are removed; then ``userdel`` (which also removes
the group useradd made for it). The private smbds keep their SMB users in a passdb under
their own directory (npipe.samba.smbd.PrivateSmbd), so no system passdb has them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ENV = "NPIPE_TEST_ACCOUNTS_FILE"
STATE_DIR = Path("/var/lib/npipe-tests")
# Where the users the tests switch to leave files of their own (directly in these).
RUNTIME_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/run"),
                Path("/run/user"))
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


@dataclass
class Session:
    """One test session's hold on the state directory and its registry."""

    state_dir: Path
    registry: Path
    lock_fd: int
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def begin(state_dir: Path = STATE_DIR) -> Session:
    """Hold the state directory's lock (shared) and make this session's empty registry."""
    while True:
        _trusted_dir(state_dir)
        lock = state_dir / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # the last session removed the directory meanwhile
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        # The last session of a run removes the lock file (and the directory) while it
        # holds it: start again if the file locked here is no longer there.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    fd_reg, name = tempfile.mkstemp(prefix="session-", dir=state_dir)
    os.close(fd_reg)
    return Session(state_dir, Path(name), fd)


def end(session: Session) -> Session:
    """End the session: if it is the last one running, remove every registered account
    (see the module's docstring), else leave its registry for the last one."""
    if not registered([session.registry]):  # nothing to hand over to a later session
        session.registry.unlink(missing_ok=True)
    try:
        fcntl.flock(session.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another session runs: it (or a later one) removes them
        os.close(session.lock_fd)
        return session
    try:
        registries = sorted(session.state_dir.glob("session-*"))
        names = registered(registries)
        for name in names:
            problem = remove_account(name)
            if problem is None:
                session.removed.append(name)
            else:
                session.problems.append(problem)
        if not session.problems:
            for registry in registries:
                registry.unlink(missing_ok=True)
            (session.state_dir / "lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: a session has just begun
                session.state_dir.rmdir()
    finally:
        os.close(session.lock_fd)
    return session


def registered(registries: Iterable[Path]) -> list[str]:
    """The account names in these registries, each once, in the order first written."""
    names: dict[str, None] = {}
    for registry in registries:
        with contextlib.suppress(FileNotFoundError):
            for line in registry.read_text().splitlines():
                if line.strip():
                    names[line.strip()] = None
    return list(names)


def remove_account(name: str) -> str | None:
    """Remove the account ``name`` and the files it left in RUNTIME_DIRS; None, or what
    went wrong. An account that is already gone is not a problem."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return None
    if uid == 0:
        return f"{name} has uid 0: not removed"
    for directory in RUNTIME_DIRS:
        _remove_owned_by(directory, uid)
    userdel = shutil.which("userdel") or shutil.which("userdel", path=_SBIN_PATH) or "userdel"
    deadline = time.monotonic() + 20.0
    killed = False
    while True:
        done = subprocess.run([userdel, name], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode == 0 or (done.returncode == 6 and not _exists(name)):
            return None  # (6: no such user: someone else removed it meanwhile)
        # 8: in use by a process still running; 1 or 10: another useradd or userdel may
        # hold /etc/passwd or /etc/group (retried for a while).
        busy = done.returncode == 8
        locked = done.returncode in (1, 10)
        if busy and not killed:
            _kill_processes_of(uid)
            killed = True
        elif not (busy or locked) or time.monotonic() > deadline:
            return f"userdel {name} failed ({done.returncode}): {done.stderr.strip()}"
        time.sleep(0.2)


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _trusted_dir(directory: Path) -> None:
    """Make ``directory`` (root's, 0700) if missing; refuse one that someone other than
    root could write to: its registries name the accounts that are removed."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    st = os.stat(directory, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{directory} is not a directory that only root can write to")


def _remove_owned_by(directory: Path, uid: int) -> None:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _kill_processes_of(uid: int) -> None:
    """SIGKILL every process whose real, effective or saved uid is ``uid``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("Uid:"):
                    if uid in {int(u) for u in line.split()[1:4]}:
                        os.kill(int(proc.name), signal.SIGKILL)
                    break
