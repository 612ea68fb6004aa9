"""The suite removes the Unix accounts it created when it ends (tests/suite_accounts.py):
the throwaway accounts here (npt-cl*-<pid>) go through the same machinery, in a state
directory of their own, so this session's real one is left alone."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import suite_accounts

from npipe.samba.smbd import ensure_unix_user
from npipe.testing.netns import skip_or_fail

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _root() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        skip_or_fail("needs root: it creates and removes Unix accounts")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="npa"))  # root's, 0700
    try:
        yield parent / "state"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def account() -> Iterator[Callable[[str], str]]:
    """Names of throwaway accounts (not created); any still there at the end goes."""
    names: list[str] = []

    def name(tag: str) -> str:
        names.append(f"npt-cl{tag}-{os.getpid()}")
        return names[-1]

    yield name
    for leftover in names:
        if exists(leftover):
            subprocess.run(["userdel", "-f", leftover], capture_output=True, check=False)


def exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def useradd(name: str) -> pwd.struct_passwd:
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    return pwd.getpwnam(name)


def test_this_session_records_what_it_creates() -> None:
    registry = Path(os.environ[suite_accounts.ENV])
    assert registry.parent == suite_accounts.STATE_DIR and registry.is_file()


def test_the_session_removes_what_it_created_and_keeps_what_was_there(
    state_dir: Path, account: Callable[[str], str]
) -> None:
    made, kept = account("made"), account("kept")
    before = useradd(kept)  # an account that exists before the session
    session = suite_accounts.begin(state_dir)
    # A child (as the suite's subprocesses do) ensures both through the product's code.
    code = textwrap.dedent(f"""
        from npipe.samba.smbd import ensure_unix_user
        ensure_unix_user({made!r}); ensure_unix_user({kept!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, suite_accounts.ENV: str(session.registry)})
    assert session.registry.read_text() == f"{made}\n", "only the account it created"
    pw = pwd.getpwnam(made)
    # What the account leaves: its pipe directory, and a process still running as it
    # (userdel refuses an account in use: the process is killed first).
    pipe_dir = Path(f"/tmp/npipe-{pw.pw_uid}")
    pipe_dir.mkdir(mode=0o700)
    (pipe_dir / "sock").touch()
    os.chown(pipe_dir, pw.pw_uid, pw.pw_gid)
    sleeper = subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                                "--clear-groups", "sleep", "600"])
    try:
        ensure_unix_user(made)  # later tests of the session still find it
        assert exists(made)
        suite_accounts.end(session)
        assert (session.removed, session.problems) == ([made], [])
        assert not exists(made) and not pipe_dir.exists()
        assert sleeper.wait(timeout=10) != 0
        assert pwd.getpwnam(kept) == before, "an account that was there stays"
        assert not state_dir.exists(), "the last session leaves no state behind"
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(pipe_dir, ignore_errors=True)


def test_the_last_session_to_end_removes_the_accounts(
    state_dir: Path, account: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = account("a"), account("b")
    a = suite_accounts.begin(state_dir)
    b = suite_accounts.begin(state_dir)
    monkeypatch.setenv(suite_accounts.ENV, str(a.registry))
    ensure_unix_user(first)
    monkeypatch.setenv(suite_accounts.ENV, str(b.registry))
    ensure_unix_user(second)
    ensure_unix_user(first)  # b uses a's account
    suite_accounts.end(a)
    assert a.removed == [] and exists(first) and exists(second), "b still runs"
    suite_accounts.end(b)
    assert (sorted(b.removed), b.problems) == (sorted([first, second]), [])  # any order
    assert not exists(first) and not exists(second)


def test_a_killed_sessions_accounts_go_with_the_next_session(
    state_dir: Path, account: Callable[[str], str]
) -> None:
    orphan = account("orph")
    state_dir.mkdir(mode=0o700)
    useradd(orphan)
    (state_dir / "session-killed").write_text(f"{orphan}\n")  # its registry, left behind
    session = suite_accounts.begin(state_dir)
    suite_accounts.end(session)
    assert (session.removed, session.problems) == ([orphan], [])
    assert not exists(orphan)


def test_a_state_directory_others_can_write_is_refused(state_dir: Path) -> None:
    state_dir.mkdir()
    state_dir.chmod(0o777)  # anyone could name accounts to remove in it
    with pytest.raises(RuntimeError, match="only root"):
        suite_accounts.begin(state_dir)
