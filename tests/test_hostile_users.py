"""Hostile local users: nobody can make root's tools, another user's server or another
user's clients misbehave (a review's findings, each reproduced here as real users).

A (npipe-t1) serves, B (npipe-t2) calls, C (npipe-t3) attacks. Every process of theirs
runs as that user (grpc_support); root's tools (``npipe ls``, ``--prune``) run in this
process or as root children. Needs root.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_support import (
    TestUser,
    background_python,
    call_by_name,
    ready_path,
    run_python,
    serve_as,
)

from npipe.local import reclaim

pytestmark = pytest.mark.root


@pytest.fixture
def fresh_machine(fresh_machine_dir: Path) -> Path:
    return fresh_machine_dir


def default_pipe_dir(user: TestUser) -> Path:
    """The user's pipe directory as its processes here find it (no XDG_RUNTIME_DIR)."""
    return Path(f"/tmp/npipe-{user.uid}")


serve = serve_as
call = call_by_name


# --- 1. root's prune never follows a path that a user wrote ----------------------------

# C plants a record whose private directory is reached through its own link, with a
# FIFO as the directory's owner file: whoever reads the FIFO (root, after its checks)
# unblocks C, which then swings the link to /tmp, so that the path now names the
# victim's pipe directory. Prints OPENED (root read the FIFO) or NEVER after 4 s.
PLANT = """
    victim = {victim}
    own = {own!r}
    os.makedirs(own, mode=0o700, exist_ok=True)
    fake = os.path.join(own, "fake", f"npipe-{{victim}}")
    os.makedirs(fake, mode=0o700)
    os.chmod(fake, 0o700)
    fifo = os.path.join(fake, "owner")
    os.mkfifo(fifo, 0o600)
    lnk = os.path.join(own, "lnk")
    os.symlink("fake", lnk)
    with open(os.path.join(own, ".lock-00000000000000aa"), "w") as f:
        json.dump({{"pid": 1, "start": 0,
                   "private": os.path.join(lnk, f"npipe-{{victim}}")}}, f)
    print("PLANTED", flush=True)
    deadline = time.monotonic() + 4
    opened = False
    while time.monotonic() < deadline and not opened:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader opens
        except OSError:
            time.sleep(0.005)
            continue
        opened = True
        os.unlink(lnk)
        os.symlink("/tmp", lnk)
        os.write(fd, b'{{"pid": 1, "start": 0}}')
        os.close(fd)
    print("OPENED" if opened else "NEVER", flush=True)
"""


def test_root_prune_never_follows_a_users_record_to_another_users_files(
    a: TestUser, c: TestUser
) -> None:
    """The review's attack on `npipe ls --prune`: with the old code root removed A's
    whole pipe directory (/tmp/npipe-<A>) and A's live server with it."""
    own = default_pipe_dir(c)
    for leftover in ("fake", "lnk", ".lock-00000000000000aa"):
        p = own / leftover
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)
    with serve(a, "victim") as server:
        path = ready_path(server)
        victim_dir = default_pipe_dir(a)
        before = {p.name for p in victim_dir.iterdir()}
        assert any(n.startswith(".np-") for n in before), before  # A's private directory
        with background_python(PLANT.format(victim=a.uid, own=str(own)), user=c,
                               ready="PLANTED") as attacker:
            removed: list[Path] = []
            for _ in range(3):
                removed += reclaim.reclaim_all()
            assert attacker.proc.stdout is not None
            verdict = attacker.proc.stdout.readline().strip()
        assert verdict == "NEVER", "root read the FIFO in C's directory"
        assert not [p for p in removed if p == victim_dir or victim_dir in p.parents], removed
        assert {p.name for p in victim_dir.iterdir()} >= before
        assert path.is_socket()
        assert "caller" in call(a, "victim", server_user=None)
    assert not os.path.lexists(own / ".lock-00000000000000aa"), "the bogus record goes"


@pytest.mark.parametrize("target", ["victim-pipe-dir", "victim-private-dir"])
def test_a_record_naming_another_users_directory_is_ignored(
    a: TestUser, c: TestUser, target: str
) -> None:
    with serve(a, "victim") as server:
        ready_path(server)
        victim_dir = default_pipe_dir(a)
        private = next(p for p in victim_dir.iterdir() if p.name.startswith(".np-"))
        named = victim_dir if target == "victim-pipe-dir" else private
        record = f'{{"pid": 1, "start": 0, "private": "{named}", "path": "{private}/g"}}'
        run_python(f"""
            os.makedirs({str(default_pipe_dir(c))!r}, mode=0o700, exist_ok=True)
            with open({str(default_pipe_dir(c) / ".lock-00000000000000bb")!r}, "w") as f:
                f.write({record!r})
        """, user=c).check()
        removed = reclaim.reclaim_all()
        assert named.is_dir() and (private / "g").is_socket(), removed
        assert "caller" in call(a, "victim", server_user=None)


# --- 3. npipe ls neither hangs nor eats memory on what a user put beside a socket -------


@pytest.mark.parametrize("note", ["fifo", "dev-zero-link"])
def test_ls_as_root_survives_a_hostile_acl_note(
    fresh_machine: Path, c: TestUser, note: str
) -> None:
    with serve(c, "trap", "npipe.Acl.allow(everyone=True)") as server:
        path = ready_path(server)
        note_file = path.with_name(f".acl-{path.name}")
        dotnet = Path(f"/tmp/CoreFxPipe_trap{os.getpid()}")
        make = ("os.mkfifo(note)" if note == "fifo" else "os.symlink('/dev/zero', note)")
        with background_python(f"""
            note = {str(note_file)!r}
            os.unlink(note)
            {make}
            # and a .NET-style socket in /tmp with the same beside it
            s = socket.socket(socket.AF_UNIX)
            s.bind({str(dotnet)!r})
            s.listen()
            note = {str(dotnet.with_name(".acl-" + dotnet.name))!r}
            {make}
            print("READY", flush=True)
            sys.stdin.read()
            os.unlink({str(dotnet)!r})
            os.unlink(note)
        """, user=c):
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "npipe", "ls"], capture_output=True,
                                  text=True, timeout=30)
            assert time.monotonic() - started < 20
        assert done.returncode == 0, done.stderr
        rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
        assert rows["trap"][1:4] == ["live", c.name, "?"], done.stdout
        assert len(done.stdout) < 10_000


# --- 4. root's prune never waits on a lock that a user holds ----------------------------


def test_prune_as_root_skips_a_lock_a_user_holds(c: TestUser) -> None:
    own = default_pipe_dir(c)
    lock = own / ".lock-00000000000000cc"
    with background_python(f"""
        import fcntl
        os.makedirs({str(own)!r}, mode=0o700, exist_ok=True)
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b'{{"pid": 1, "start": 0}}')
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("READY", flush=True)
        sys.stdin.read()
        os.unlink({str(lock)!r})
    """, user=c):
        out: list[list[Path]] = []
        pruner = threading.Thread(target=lambda: out.append(reclaim.reclaim_all()), daemon=True)
        pruner.start()
        pruner.join(15)
        assert not pruner.is_alive(), "root's prune waited on C's lock"
        assert lock.exists() and lock not in out[0]


# --- 2. a squatted .u<uid> in the machine-wide directory does not stop its user ---------


def test_a_squatted_user_dir_does_not_stop_its_user(
    fresh_machine: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    squat = fresh_machine / f".u{a.uid}"
    run_python(f"os.mkdir({str(squat)!r}, 0o711)", user=c).check()
    assert os.lstat(squat).st_uid == c.uid
    with serve(a, "shop", f"npipe.Acl.allow(users=[{b.name!r}])") as server:
        path = ready_path(server)
        st = os.lstat(path.parent)
        assert path.parent.name.startswith(f".u{a.uid}-") and st.st_uid == a.uid
        assert stat.S_IMODE(st.st_mode) == 0o711
        outcome = call(b, "shop", server_user=a.name)
        assert outcome.get("caller", {}).get("uid") == b.uid, outcome  # type: ignore[union-attr]
        # C cannot pass a socket of its own off as A's through its squatted directory.
        run_python(f"""
            s = socket.socket(socket.AF_UNIX)
            s.bind({str(squat / "fake")!r})
            s.listen()
            os.symlink({str(squat / "fake")!r}, {str(fresh_machine / "fake")!r})
        """, user=c).check()
        fake = call(b, "fake", server_user=a.name)
        assert fake.get("error") == "AccessDenied", fake
    # ... and a new server of A's reuses its own directory, not a new one each time.
    with serve(a, "shop") as again:
        assert ready_path(again).parent == path.parent


# --- 5. a user's default pipe directory, made first by someone else ---------------------


def test_a_squatted_default_pipe_dir_neither_hides_names_nor_goes_unexplained(
    fresh_machine: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    victim_dir = default_pipe_dir(a)
    shutil.rmtree(victim_dir, ignore_errors=True)  # (A runs nothing right now)
    with background_python(f"""
        os.mkdir({str(victim_dir)!r}, 0o755)
        s = socket.socket(socket.AF_UNIX)
        s.bind({str(victim_dir / "shop")!r})
        s.listen()
        print("READY", flush=True)
        sys.stdin.read()
    """, user=c):
        try:
            with serve(b, "shop", "npipe.Acl.allow(everyone=True)") as server:
                ready_path(server)
                # A's client passes over the directory C made and reaches B's pipe.
                outcome = call(a, "shop", server_user=b.name)
                assert outcome.get("caller", {}).get("uid") == a.uid, outcome  # type: ignore[union-attr]
            # A's own server cannot use that directory: the error names who made it.
            with serve(a, "mine") as mine:
                line = mine.ready_line
            assert line.startswith("SERVER FAILED AccessDenied"), line
            assert c.name in line and str(victim_dir) in line and "NPIPE_PIPE_DIR" in line
        finally:
            shutil.rmtree(victim_dir, ignore_errors=True)


# --- one name for the whole machine ------------------------------------------------------


def test_an_owner_only_pipe_is_one_name_for_the_whole_machine(
    fresh_machine: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    with serve(a, "diary") as server:  # owner-only
        path = ready_path(server)
        assert os.readlink(fresh_machine / "diary") == str(path)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        with serve(c, "diary") as second:
            assert second.ready_line.startswith("SERVER FAILED PipeInUse"), second.ready_line
            assert a.name in second.ready_line
        refused = run_python(f"""
            import asyncio
            async def main():
                try:
                    await npipe.open_connection("diary", server_user={a.name!r})
                    result("opened")
                except npipe.NpipeError as e:
                    result([type(e).__name__, str(e)])
            asyncio.run(main())
        """, user=b).check()
        assert refused[0] == "AccessDenied", refused  # the socket is A's alone
        assert "caller" in call(a, "diary", server_user=None)
        done = subprocess.run([sys.executable, "-m", "npipe", "ls"], capture_output=True,
                              text=True, timeout=60, check=True)
        rows = [line.split() for line in done.stdout.splitlines()[1:]]
        assert [r[1:4] for r in rows if r[0] == "diary"] == [["live", a.name, "owner"]]
    assert not os.path.lexists(fresh_machine / "diary")


def test_a_dead_socket_never_shadows_a_live_name(
    fresh_machine: Path, a: TestUser, b: TestUser
) -> None:
    own = default_pipe_dir(a)
    run_python(f"""
        os.makedirs({str(own)!r}, mode=0o700, exist_ok=True)
        s = socket.socket(socket.AF_UNIX)
        s.bind({str(own / "shop")!r})  # a socket left by a server that died
        s.close()
    """, user=a).check()
    try:
        with serve(b, "shop", "npipe.Acl.allow(everyone=True)") as server:
            ready_path(server)
            outcome = call(a, "shop", server_user=b.name)
            assert outcome.get("caller", {}).get("uid") == a.uid, outcome  # type: ignore[union-attr]
    finally:
        (own / "shop").unlink(missing_ok=True)


def test_lock_files_do_not_pile_up(fresh_machine: Path, a: TestUser) -> None:
    own = default_pipe_dir(a)
    names = [f"pile{i}" for i in range(4)]
    before = {p.name for p in own.glob(".lock-*")} if own.exists() else set()
    run_python(f"""
        for name in {names!r}:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
            npipe.grpc.add_pipe_port(server, name)
            server.start()
            server.stop(None).wait(5)
    """, user=a).check()
    assert {p.name for p in own.glob(".lock-*")} <= before


def test_a_server_stopped_by_sighup_gives_up_its_name(fresh_machine: Path, a: TestUser) -> None:
    """A terminal that closes sends SIGHUP: the CLI servers stop as on SIGTERM."""
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "npipe", "serve-grpc", "npipe.examples.buy.serve:add_services",
         "--pipe", "hup"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.lexists(fresh_machine / "hup") and time.monotonic() < deadline:
            time.sleep(0.05)
        target = Path(os.readlink(fresh_machine / "hup"))
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not os.path.lexists(fresh_machine / "hup") and not os.path.lexists(target)


# --- 6. forwarding an owner-only pipe to a TCP port is said out loud -----------------


@pytest.mark.parametrize("acl", ["owner-only", "everyone"])
def test_forwarding_an_owner_only_pipe_to_tcp_warns(
    pipe_dir: Path, caplog: pytest.LogCaptureFixture, acl: str
) -> None:
    """A loopback port is open to every local user, who then reaches the pipe as the
    forwarder's user: a pipe that admits only its owner gets a warning that says so and
    names unix: instead; a unix: listener (mode 0600) does not."""
    import asyncio
    import logging

    import npipe
    from npipe.bridges import start_forward
    from npipe.bridges.endpoint import parse_endpoint

    async def main() -> list[str]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await npipe.start_server(
            echo, "fwdowner",
            acl=npipe.Acl() if acl == "owner-only" else npipe.Acl.allow(everyone=True))
        said = []
        try:
            for where in ("tcp:127.0.0.1:0", f"unix:{pipe_dir.parent / 'fwd.sock'}"):
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="npipe.bridges"):
                    fwd = await start_forward("fwdowner", parse_endpoint(where))
                    await fwd.close()
                said.append(" ".join(r.getMessage() for r in caplog.records))
        finally:
            server.close()
        return said

    tcp, unix = asyncio.run(main())
    if acl == "owner-only":
        assert "admits only its owner" in tcp and "every user of this host" in tcp, tcp
        assert "unix:PATH" in tcp
    else:
        assert tcp == ""
    assert unix == ""


def test_without_the_machine_wide_directory_a_server_says_so_once(
    pipe_dir: Path, no_machine_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No /run/npipe: the one-name guarantee cannot hold, and the first server says so
    in one line (naming `npipe setup`); the next ones of the process do not repeat it."""
    import asyncio
    import logging

    import npipe
    from npipe.local import claim

    claim._warned.clear()

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        for name in ("alone1", "alone2"):
            server = await npipe.start_server(echo, name)
            assert server.path == pipe_dir / name
            server.close()

    with caplog.at_level(logging.WARNING, logger="npipe.claim"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "npipe.claim"]
    assert len(said) == 1 and len(said[0].splitlines()) == 1, said
    assert "no machine-wide pipe directory" in said[0] and "npipe setup" in said[0]
