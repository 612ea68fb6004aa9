"""One pipe namespace for the whole machine: real users serve and call pipes by name alone.

A (npipe-t1) serves, B (npipe-t2) is admitted by A's ACL, C (npipe-t3) is not, and C
also plays the squatter. Every process runs as its user (see grpc_support); the
machine-wide directory is the test run's own (conftest.machine_dir). Needs root.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_support import (
    WAIT,
    TestUser,
    background_python,
    call_by_name,
    ready_path,
    run_python,
    serve_as,
)

import npipe
from npipe.local.listener import is_live

pytestmark = pytest.mark.root


def _acl_for(user: TestUser) -> str:
    return f"npipe.Acl.allow(users=[{user.name!r}])"



_serve = serve_as
_call = call_by_name
_ready = ready_path


def test_another_user_calls_a_shared_pipe_by_name_alone(
    machine_dir: Path, a: TestUser, b: TestUser
) -> None:
    with _serve(a, "shop", _acl_for(b)) as server:
        path = _ready(server)
        # Published: a link owned by A, to A's socket in A's own directory.
        name = machine_dir / "shop"
        assert os.lstat(name).st_uid == a.uid and stat.S_ISLNK(os.lstat(name).st_mode)
        assert Path(os.readlink(name)) == path == machine_dir / f".u{a.uid}" / "shop"
        st = os.lstat(path.parent)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (a.uid, 0o711)

        outcome = _call(b, "shop", server_user=a.name)
        caller = outcome.get("caller")
        assert isinstance(caller, dict), outcome
        assert (caller["uid"], caller["user"]) == (b.uid, b.name)
        # Names are case-insensitive machine-wide too.
        assert "caller" in _call(b, r"\\.\pipe\SHOP", server_user=a.name)
    assert not os.path.lexists(machine_dir / "shop"), "the name goes with the server"
    assert not os.path.lexists(path)


def test_a_user_the_acl_does_not_name_is_refused(a: TestUser, b: TestUser, c: TestUser) -> None:
    with _serve(a, "shop", _acl_for(b)) as server:
        _ready(server)
        outcome = _call(c, "shop", server_user=a.name)
        # The front door answers C's call itself: the reason, not a closed socket.
        assert outcome.get("code") == "PERMISSION_DENIED", outcome
        assert outcome["details"] == (
            f"the ACL of pipe \\\\.\\pipe\\shop does not admit {c.name} uid={c.uid} "
            f"pid={outcome['pid']}"
        ), outcome


def test_a_client_refuses_a_server_it_did_not_name(a: TestUser, b: TestUser) -> None:
    with _serve(a, "shop", _acl_for(b)) as server:
        _ready(server)
        outcome = _call(b, "shop", server_user=None)
        assert outcome.get("error") == "AccessDenied", outcome
        assert a.name in str(outcome["message"]) and "server_user" in str(outcome["message"])


def test_a_squatter_gets_the_name_but_no_clients(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    """C takes "shop" first: A's server gets PipeInUse, B (expecting A) refuses C."""
    everyone = "npipe.Acl.allow(everyone=True)"
    with _serve(c, "shop", everyone) as squatter:
        _ready(squatter)
        with _serve(a, "shop", _acl_for(b)) as server:
            assert server.ready_line.startswith("SERVER FAILED PipeInUse"), server.ready_line
            assert c.name in server.ready_line  # it says who holds the name
        outcome = _call(b, "shop", server_user=a.name)
        assert outcome.get("error") == "AccessDenied", outcome
        assert c.name in str(outcome["message"])
        # A's own directory stays A's: C cannot put a socket there or move A's name.
        probe = run_python(f"""
            import socket
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind({str(machine_dir / f".u{a.uid}" / "shop")!r})
                result("bound")
            except OSError as e:
                result(e.errno)
        """, user=c).check()
        # EACCES: A's directory exists (A's server made it before it met C's name) and
        # is A's alone; a squatted one is tried in test_hostile_users.
        assert probe == 13, probe


def test_first_instance_wins_across_users(a: TestUser, b: TestUser, c: TestUser) -> None:
    with _serve(a, "shop", _acl_for(b)) as first:
        _ready(first)
        with _serve(c, "shop", "npipe.Acl.allow(everyone=True)") as second:
            assert second.ready_line.startswith("SERVER FAILED PipeInUse"), second.ready_line
        assert "caller" in _call(b, "shop", server_user=a.name)


def test_a_squatter_cannot_remove_or_replace_a_live_name(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    with _serve(a, "shop", _acl_for(b)) as server:
        _ready(server)
        name = str(machine_dir / "shop")
        tries = run_python(f"""
            out = {{}}
            for what, act in (("unlink", lambda: os.unlink({name!r})),
                              ("rename", lambda: os.rename({name!r}, {name!r} + ".x"))):
                try:
                    act()
                    out[what] = "done"
                except OSError as e:
                    out[what] = e.errno
            result(out)
        """, user=c).check()
        assert tries == {"unlink": 1, "rename": 1}, tries  # EPERM: the sticky bit
        assert "caller" in _call(b, "shop", server_user=a.name)


@pytest.mark.parametrize("dotnet", [False, True], ids=["machine-wide", "dotnet"])
def test_grpc_redials_never_reach_a_squatter(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser, dotnet: bool
) -> None:
    """B's channel keeps dialling the socket path it resolved (in A's own directory):
    after A's server goes and C takes the name, B's re-dials reach nothing of C's.
    .NET's names (/tmp/CoreFxPipe_NAME) sit where anyone can create a name: there the
    channel dials through a relay that checks the listener on every connection (and
    answers PERMISSION_DENIED for one it does not trust)."""
    name = "shop-dotnet" if dotnet else "shop"
    extra = ", dotnet=True" if dotnet else ""
    client = f"""
        chan = npipe.grpc.channel({name!r}, server_user={a.name!r})
        call = chan.unary_unary("/t.Svc/Whoami")
        first = json.loads(call(b"", timeout=10))["uid"]
        print("READY", first, flush=True)
        sys.stdin.readline()
        try:
            call(b"", timeout=3, wait_for_ready=False)
            print("AGAIN reached", flush=True)
        except grpc.RpcError as e:
            print("AGAIN", e.code().name, flush=True)
        sys.stdin.read()
    """
    with _serve(a, name, _acl_for(b) + extra) as server:
        first = _ready(server)
        with background_python(client, user=b) as caller:
            assert caller.ready_line == f"READY {b.uid}"
            assert server.proc.stdin is not None
            server.proc.stdin.close()  # A's server stops and gives up the name
            server.proc.wait(WAIT)
            assert not os.path.lexists(first)
            with _serve(c, name, "npipe.Acl.allow(everyone=True)" + extra) as squatter:
                taken = _ready(squatter)
                assert is_live(taken) and (taken == first) == dotnet
                assert caller.proc.stdin is not None and caller.proc.stdout is not None
                caller.proc.stdin.write("\n")
                caller.proc.stdin.flush()
                again = caller.proc.stdout.readline().strip()
                # (the relay answers for the pipe: its listener is not A's, the reason)
                assert again == ("AGAIN PERMISSION_DENIED" if dotnet
                                 else "AGAIN UNAVAILABLE"), again
                assert squatter.proc.stdin is not None and squatter.proc.stdout is not None
                squatter.proc.stdin.close()
                squatter.proc.wait(WAIT)
                handled = squatter.proc.stdout.read()
            assert "HANDLED []" in handled, handled  # C's server saw no call at all


def test_owner_only_pipes_are_published_but_stay_private(
    machine_dir: Path, a: TestUser
) -> None:
    """One name for the whole machine, whatever the ACL (as on Windows): an owner-only
    pipe holds its name machine-wide too, with a socket only its owner can open."""
    with _serve(a, "diary", "npipe.Acl()") as server:
        path = _ready(server)
        assert Path(os.readlink(machine_dir / "diary")) == path
        assert path.parent == machine_dir / f".u{a.uid}"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_ls_lists_both_places_with_owner_state_and_acl(
    machine_dir: Path, pipe_dir: Path, a: TestUser, b: TestUser
) -> None:
    with _serve(a, "shop", _acl_for(b)) as server:
        _ready(server)
        mine = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        npipe.grpc.add_pipe_port(mine, "mine")  # a private pipe of this (root) process
        mine.start()
        try:
            r = subprocess.run([sys.executable, "-m", "npipe", "ls"], capture_output=True,
                               text=True, timeout=60, check=True)
        finally:
            mine.stop(None)
    lines = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert lines["shop"][1:4] == ["live", a.name, f"owner,user:{b.name}"], r.stdout
    assert str(machine_dir / "shop") in r.stdout
    assert lines["mine"][1:4] == ["live", "root", "owner"], r.stdout


def test_machine_dir_not_trusted_unless_roots_and_sticky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, a: TestUser
) -> None:
    from npipe.local.namespace import usable_machine_dir

    fake = tmp_path / "run"
    fake.mkdir()
    monkeypatch.setenv("NPIPE_MACHINE_DIR", str(fake))
    os.chmod(fake, 0o777)  # world-writable, not sticky: anyone could swap names
    assert usable_machine_dir() is None
    os.chmod(fake, 0o1777)
    os.chown(fake, a.uid, -1)  # sticky but a user's: that user could swap names
    assert usable_machine_dir() is None
    os.chown(fake, 0, -1)
    assert usable_machine_dir() == fake
