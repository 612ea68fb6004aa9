"""Shared test setup: every test gets its own short pipe directory."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def created_accounts() -> Iterator[None]:
    """The Unix accounts this session creates are removed when it ends, or by the last of
    the sessions running at once (tests/suite_accounts.py): those that existed before are
    kept. What creates one appends it to the registry named by $NPIPE_TEST_ACCOUNTS_FILE
    (children inherit it). Being session-wide and autouse, it is set up before the tests'
    own fixtures and torn down after them (after the servers that ran as the accounts)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        yield  # (only root creates accounts)
        return
    import suite_accounts

    session = suite_accounts.begin()
    old = os.environ.get(suite_accounts.ENV)
    os.environ[suite_accounts.ENV] = str(session.registry)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(suite_accounts.ENV, None)
        else:
            os.environ[suite_accounts.ENV] = old
        suite_accounts.end(session)
    if session.problems:
        raise RuntimeError("the test accounts were not all removed: "
                           + "; ".join(session.problems))


@pytest.fixture(scope="session", autouse=True)
def machine_dir() -> Iterator[Path]:
    """The machine-wide pipe directory for this test run (npipe.local.namespace): a fresh
    root-owned sticky one when the tests run as root, so that tests never publish names
    in the machine's own /run/npipe; children inherit it through the environment."""
    posix = hasattr(os, "geteuid")  # (Windows: one namespace per machine, the kernel's)
    d = Path(tempfile.mkdtemp(prefix="npm", dir="/tmp" if posix else None))
    machine = d / "run"
    old = os.environ.get("NPIPE_MACHINE_DIR")
    os.environ["NPIPE_MACHINE_DIR"] = str(machine)
    if posix and os.geteuid() == 0:
        os.chmod(d, 0o755)
        machine.mkdir()
        os.chmod(machine, 0o1777)
    try:
        yield machine
    finally:
        if old is None:
            os.environ.pop("NPIPE_MACHINE_DIR", None)
        else:
            os.environ["NPIPE_MACHINE_DIR"] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fresh_machine_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A machine-wide pipe directory of this test's own (as machine_dir: root's and
    sticky when root), that no user has a directory or a name in yet; children inherit
    it through the environment."""
    d = Path(tempfile.mkdtemp(prefix="npf", dir="/tmp"))
    machine = d / "run"
    monkeypatch.setenv("NPIPE_MACHINE_DIR", str(machine))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chmod(d, 0o755)
        machine.mkdir()
        os.chmod(machine, 0o1777)
    yield machine
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def no_machine_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No usable machine-wide directory (one that is not sticky, so not even root's
    servers use or make it): pipes are then served in their owner's pipe directory."""
    d = Path(tempfile.mkdtemp(prefix="npn", dir="/tmp"))
    os.chmod(d, 0o755)
    monkeypatch.setenv("NPIPE_MACHINE_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pipe_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private pipe directory (short: socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="np", dir="/tmp"))
    monkeypatch.setenv("NPIPE_PIPE_DIR", str(d / "pipes"))
    yield d / "pipes"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def np_dir(pipe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for smbd's np/ directory (root's, 0700): the tests play smbd there,
    which runs as root, so they need root (a failure under CI=true, else a skip)."""
    if os.geteuid() != 0:
        reason = "needs root: it plays smbd, which runs as root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true", pytrace=False)
        pytest.skip(reason)
    np = pipe_dir.parent / "np"
    np.mkdir(mode=0o700)
    monkeypatch.setenv("NPIPE_SAMBA_NP_DIR", str(np))
    return np


# --- three real users (npipe-t1..t3, made if missing: root only) for the tests that run
# servers and clients as other users; A serves, B is admitted, C is not (or attacks).


@pytest.fixture(scope="session")
def users() -> Any:
    from grpc_support import ensure_test_users, require_root  # (grpc: loaded when used)

    require_root()
    return ensure_test_users()


@pytest.fixture
def a(users: Any) -> Any:
    return users["npipe-t1"]


@pytest.fixture
def b(users: Any) -> Any:
    return users["npipe-t2"]


@pytest.fixture
def c(users: Any) -> Any:
    return users["npipe-t3"]


# --- platform scope: @pytest.mark.linux_only("why") runs on Linux only; elsewhere (the
# macOS CI job) the test is skipped with "Linux-only: why", listed in the summary (-ra).


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if sys.platform.startswith("linux"):
        return
    for item in items:
        marker = item.get_closest_marker("linux_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "not ported"
            item.add_marker(pytest.mark.skip(reason=f"Linux-only: {why}"))
