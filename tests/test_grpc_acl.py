"""Who may call a gRPC pipe, and whom a client trusts: clients and servers as other users.

Needs root to run processes as npipe-t1 / npipe-t2 (created here if absent); without
root these tests skip, or fail when CI=true (see grpc_support.require_root).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpc_support import (
    WAIT,
    TestUser,
    background_python,
    ensure_test_users,
    make_traversable,
    method,
    require_root,
    run_python,
    serve,
    temp_pipe_dir,
    whoami_client,
)

import npipe
import npipe.grpc
from npipe.testing.netns import skip_or_fail

pytestmark = pytest.mark.root


@pytest.fixture(scope="session")
def users() -> dict[str, TestUser]:
    require_root()
    return ensure_test_users()


@pytest.fixture
def t1(users: dict[str, TestUser]) -> TestUser:
    return users["npipe-t1"]


@pytest.fixture
def t2(users: dict[str, TestUser]) -> TestUser:
    return users["npipe-t2"]


@pytest.fixture
def shared_dir(users: dict[str, TestUser]) -> Iterator[Path]:
    """A root-owned pipe dir that other users may traverse (0711), not list."""
    with temp_pipe_dir() as d:
        make_traversable(d)
        yield d


def _expected_caller(user: TestUser, pid: int) -> dict[str, object]:
    return {
        "transport": "local", "uid": user.uid, "gid": user.gid, "pid": pid,
        "user": user.name, "name": user.name,
    }


def _subset(caller: dict[str, object], keys: dict[str, object]) -> dict[str, object]:
    return {k: caller[k] for k in keys}


ACLS: dict[str, Callable[[TestUser], npipe.Acl]] = {
    "user-name": lambda u: npipe.Acl.allow(users=[u.name]),
    "uid": lambda u: npipe.Acl.allow(users=[u.uid]),
    "gid": lambda u: npipe.Acl.allow(groups=[u.gid]),
    "acl-text": lambda u: npipe.Acl.parse(f"user:{u.name}"),
    "everyone": lambda u: npipe.Acl.allow(everyone=True),
}


@pytest.mark.parametrize("acl_kind", list(ACLS))
def test_allowed_user_is_served_and_identified(
    shared_dir: Path, t1: TestUser, acl_kind: str
) -> None:
    with serve(shared_dir, acl=ACLS[acl_kind](t1)) as s:
        # Open to others: the socket is 0666 and its directory traversable.
        assert stat.S_IMODE(os.lstat(s.path).st_mode) == 0o666
        assert stat.S_IMODE(os.stat(shared_dir).st_mode) == 0o711
        child = run_python(whoami_client("svc", shared_dir, server_user=0), user=t1)
        outcome = child.check()
        seen = list(s.probe.callers)
    assert outcome["uid"] == t1.uid  # the child really ran as npipe-t1
    assert "caller" in outcome, outcome
    expected = _expected_caller(t1, child.pid)
    assert _subset(outcome["caller"], expected) == expected
    assert len(seen) == 1 and seen[0] is not None
    assert (seen[0].uid, seen[0].pid, seen[0].user) == (t1.uid, child.pid, t1.name)


def test_user_not_in_acl_is_refused_and_logged(
    shared_dir: Path, t1: TestUser, t2: TestUser, caplog: pytest.LogCaptureFixture
) -> None:
    acl = npipe.Acl.allow(users=[t1.name])
    with caplog.at_level(logging.WARNING, logger="npipe.frontdoor"), serve(
        shared_dir, acl=acl
    ) as s:
        refused = run_python(whoami_client("svc", shared_dir, server_user="root"), user=t2)
        outcome = refused.check()
        assert outcome["uid"] == t2.uid
        # Answered by the front door (never relayed to grpcio), with the reason.
        assert outcome.get("code") == "PERMISSION_DENIED", outcome
        assert "ACL of pipe" in outcome["details"] and t2.name in outcome["details"], outcome
        assert f"pid={refused.pid}" in outcome["details"], outcome
        assert s.probe.handled == []  # never reached grpcio's handlers

        # The user the ACL names still gets through the same pipe.
        allowed = run_python(whoami_client("svc", shared_dir, server_user="root"), user=t1)
        assert allowed.check()["caller"]["uid"] == t1.uid
        assert s.probe.handled == ["Whoami"]

    refusals = [
        r for r in caplog.records
        if r.name == "npipe.frontdoor" and r.getMessage().startswith("refused")
    ]
    assert refusals, [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in refusals)
    message = refusals[0].getMessage()
    assert f"uid={t2.uid}" in message and f"pid={refused.pid}" in message, message
    assert t2.name in message and str(s.path) in message, message
    assert not any(f"uid={t1.uid}" in r.getMessage() for r in refusals)


# The child tries the pipe with grpcio, then with a bare connect(), and reports both.
OWNER_ONLY_PROBE = """
    path = {path!r}
    outcome = {{"uid": os.getuid()}}
    with npipe.grpc.channel("svc", pipe_dir={pipe_dir!r}, server_user=0) as chan:
        try:
            chan.unary_unary("/t.Svc/Whoami")(b"", timeout=10)
            outcome["code"] = "OK"
        except grpc.RpcError as e:
            outcome["code"] = e.code().name
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        outcome["connect"] = "connected"
    except OSError as e:
        outcome["connect"] = errno.errorcode[e.errno]
    finally:
        s.close()
    result(outcome)
"""


def test_owner_only_pipe_shuts_out_other_users(
    shared_dir: Path, t1: TestUser, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="npipe.frontdoor"), serve(shared_dir) as s:
        assert stat.S_IMODE(os.lstat(s.path).st_mode) == 0o600
        body = OWNER_ONLY_PROBE.format(path=str(s.path), pipe_dir=str(shared_dir))
        outcome = run_python(body, user=t1).check()
        assert s.probe.handled == []
    assert outcome == {"uid": t1.uid, "code": "UNAVAILABLE", "connect": "EACCES"}
    # The kernel refused the connection: the front door never even saw it.
    assert not [r for r in caplog.records if r.getMessage().startswith("refused")]


# npipe-t2 serves t.Svc on pipe "svc" in DIR, open to npipe-t1, until its stdin closes.
SERVER_AS_T2 = """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc_support.sync_handler(grpc_support.Probe()),))
    port = npipe.grpc.add_pipe_port(
        server, "svc", acl=npipe.Acl.allow(users=["npipe-t1"]), pipe_dir={pipe_dir!r}
    )
    server.start()
    print("READY", port.path, flush=True)
    sys.stdin.read()
    server.stop(0).wait(5)
"""


def test_client_trusts_another_users_pipe_only_when_named(
    shared_dir: Path, t1: TestUser, t2: TestUser
) -> None:
    t2_dir = shared_dir / "t2"
    t2_dir.mkdir(mode=0o700)
    os.chown(t2_dir, t2.uid, t2.gid)

    with background_python(SERVER_AS_T2.format(pipe_dir=str(t2_dir)), user=t2):
        path = t2_dir / "svc"
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == t2.uid
        assert stat.S_IMODE(os.stat(t2_dir).st_mode) == 0o711  # opened up by its ACL

        untrusted = run_python(whoami_client("svc", t2_dir), user=t1).check()
        assert untrusted.get("error") == "AccessDenied", untrusted
        assert "server_user" in untrusted["message"] and t2.name in untrusted["message"]

        by_name = run_python(whoami_client("svc", t2_dir, server_user=t2.name), user=t1)
        expected = _expected_caller(t1, by_name.pid)
        assert _subset(by_name.check()["caller"], expected) == expected

        by_uid = run_python(whoami_client("svc", t2_dir, server_user=t2.uid), user=t1)
        assert by_uid.check()["caller"]["pid"] == by_uid.pid

        # The same rule holds for root as a client (this process) ...
        with pytest.raises(npipe.AccessDenied):
            npipe.grpc.channel("svc", pipe_dir=t2_dir)
        # ... and every pipe admits root, whatever its ACL says.
        with npipe.grpc.channel("svc", pipe_dir=t2_dir, server_user=t2.name) as chan:
            who = json.loads(chan.unary_unary(method("Whoami"))(b"", timeout=WAIT))
        assert (who["uid"], who["pid"]) == (0, os.getpid())
    assert not os.path.lexists(path)  # t2's server gave up its pipe on stop


def _ensure_group(name: str) -> grp.struct_group:
    """The group ``name``, made (groupadd, as root: the users fixture requires it) if
    this system has none; a group that cannot be made skips, or fails under CI=true."""
    try:
        return grp.getgrnam(name)
    except KeyError:
        pass
    groupadd = shutil.which("groupadd")  # on root's PATH, as useradd for the users
    if groupadd is None:
        skip_or_fail(f"no {name!r} group, and no groupadd to make it")
    done = subprocess.run([groupadd, name], capture_output=True, text=True, timeout=30,
                          check=False)
    try:  # another session may have made it meanwhile (groupadd exit 9)
        return grp.getgrnam(name)
    except KeyError:
        skip_or_fail(f"no {name!r} group, and groupadd failed: {done.stderr.strip()}")


def test_supplementary_group_in_acl(shared_dir: Path, t1: TestUser) -> None:
    """SO_PEERGROUPS: a caller allowed only through a supplementary group."""
    group = _ensure_group("users")
    assert group.gr_gid != t1.gid and t1.name not in group.gr_mem, group
    with serve(shared_dir, acl=npipe.Acl.allow(groups=[group.gr_name])) as s:
        body = whoami_client("svc", shared_dir, server_user=0)
        member = run_python(body, user=t1, groups=(group.gr_gid,))
        outsider = run_python(body, user=t1)
        assert len(s.probe.callers) == 1
    caller = member.check()["caller"]
    assert (caller["uid"], caller["pid"]) == (t1.uid, member.pid)
    assert group.gr_gid in caller["groups"]
    assert outsider.check().get("code") == "PERMISSION_DENIED"


def test_unreachable_pipe_dir_is_access_denied_not_pipe_not_found(t1: TestUser) -> None:
    """A live pipe in a directory the client may not enter is AccessDenied, not missing.

    Regression: find_socket() used os.path.lexists(), which turns EACCES into False,
    so the client heard "nothing at ...; is its server running?" about a running server.
    """
    with temp_pipe_dir() as private, serve(private) as s:  # 0700: root's private pipe dir
        outcome = run_python(whoami_client("svc", private, server_user=0), user=t1).check()
        assert s.probe.handled == []
    assert outcome.get("error") == "AccessDenied", outcome
    assert outcome["uid"] == t1.uid
