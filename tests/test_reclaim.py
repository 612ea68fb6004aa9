"""Nothing left behind when a server is killed: the next server, or `npipe ls --prune`,
reclaims it; nothing live and nothing of another user's is ever touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_support import TestUser, ensure_test_users, require_root, run_python

import npipe
import npipe.grpc
from npipe.local import reclaim
from npipe.local.listener import is_live, private_dir, process_start, record_alive

# A server of one kind on NAME, until killed: grpc (owner-only), shared (a gRPC pipe that
# admits everyone: published machine-wide), stream (npipe.start_server) or smb (a gRPC
# pipe also served to smbd, in its np/ directory: $NPIPE_SAMBA_NP_DIR).
SERVER = r"""
import asyncio, sys, time
from concurrent import futures
import grpc, npipe, npipe.grpc
name, kind = sys.argv[1], sys.argv[2]
if kind == "stream":
    async def main():
        async def echo(reader, writer):
            writer.write(await reader.read(100))
        server = await npipe.start_server(echo, name)
        print("READY", server.path, flush=True)
        await asyncio.sleep(600)
    asyncio.run(main())
else:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    acl = npipe.Acl.allow(everyone=True) if kind == "shared" else npipe.Acl()
    port = npipe.grpc.add_pipe_port(server, name, acl=acl, smb=kind == "smb")
    server.start()
    print("READY", port.path, flush=True)
    time.sleep(600)
"""

KINDS = ("grpc", "shared", "stream")


def _start(name: str, kind: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, name, kind], text=True,
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["READY"], (line, proc.wait(10))
    return proc, Path(line[1])


def _everything(pipe_dir: Path, machine_dir: Path) -> set[Path]:
    """What npipe has on disk in the pipe directory and the machine-wide directory."""
    found: set[Path] = set()
    for top in (pipe_dir, machine_dir):
        if top.exists():
            for root, dirs, files in os.walk(top):
                found.update(Path(root) / n for n in dirs + files)
    # (not the names a front door binds its relay connections to for a moment)
    return {p for p in found if not (p.parent.name.startswith(".np-") and p.name[0] == "c")}


@pytest.fixture
def killed_servers(pipe_dir: Path, machine_dir: Path) -> Iterator[list[Path]]:
    """Ten servers with different names and kinds, killed with SIGKILL."""
    procs = []
    paths = []
    try:
        for i in range(10):
            proc, path = _start(f"dead{i}", KINDS[i % len(KINDS)])
            procs.append(proc)
            paths.append(path)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
    yield paths


def test_a_new_server_reclaims_what_killed_servers_left(
    killed_servers: list[Path], pipe_dir: Path, machine_dir: Path
) -> None:
    left = _everything(pipe_dir, machine_dir)
    assert all(p in left for p in killed_servers), "the killed servers left their sockets"
    assert [p for p in left if p.name.startswith(".np-")], "and their private directories"
    assert [p for p in left if p.parent == machine_dir and p.name.startswith("dead")]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = npipe.grpc.add_pipe_port(server, "alive")
    server.start()
    try:
        now = _everything(pipe_dir, machine_dir)
        dead = sorted(str(p) for p in now if "dead" in p.name)
        assert dead == [], dead
        # What is left is the new server's alone: its socket and note in its directory
        # of published sockets, its name, and its lock and private dir.
        ours = {p for p in now if p.parent in (pipe_dir, port.path.parent)}
        assert port.path in ours and port.path.parent == machine_dir / f".u{os.geteuid()}"
        assert len([p for p in ours if p.name.startswith(".np-")]) == 1
        assert len([p for p in ours if p.name.startswith(".lock-")]) == 1
        names = {p.name for p in now if p.parent == machine_dir and not p.name.startswith(".u")}
        assert names == {"alive"}
        assert all(not p.is_socket() or is_live(p) for p in now)
    finally:
        server.stop(None)


def test_prune_reclaims_on_demand_and_says_what(
    killed_servers: list[Path], pipe_dir: Path, machine_dir: Path
) -> None:
    r = subprocess.run([sys.executable, "-m", "npipe", "ls", "--prune"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    removed = {line.split(" ", 1)[1] for line in r.stdout.splitlines()
               if line.startswith("removed ")}
    assert {str(p) for p in killed_servers} <= removed, r.stdout
    assert not [p for p in _everything(pipe_dir, machine_dir) if "dead" in p.name]


@pytest.fixture(scope="module")
def other() -> TestUser:
    require_root()
    return ensure_test_users()["npipe-t1"]


def test_a_live_servers_files_survive_prunes_by_others_and_by_root(
    pipe_dir: Path, machine_dir: Path, other: TestUser
) -> None:
    procs = [_start(f"live{i}", kind) for i, kind in enumerate(KINDS)]
    try:
        before = _everything(pipe_dir, machine_dir)
        # Another user prunes: its own files only (and it cannot even see ours).
        pruned = run_python("""
            from npipe.local import reclaim
            result([str(p) for p in reclaim.reclaim()])
        """, user=other).check()
        assert not [p for p in pruned if "live" in p], pruned
        # Root prunes every user's.
        assert not [p for p in reclaim.reclaim_all() if "live" in p.name]
        assert _everything(pipe_dir, machine_dir) == before
        assert all(is_live(path) for _proc, path in procs)
    finally:
        for proc, _path in procs:
            proc.kill()
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()


def _killed(name: str, kind: str, pipe_dir: Path) -> tuple[Path, set[Path]]:
    """A server of ``kind`` on ``name``, killed: its socket and what it left in the pipe
    directory (its lock file and private directory)."""
    before = set(pipe_dir.iterdir()) if pipe_dir.exists() else set()
    proc, path = _start(name, kind)
    proc.kill()
    proc.wait(10)
    assert proc.stdout is not None
    proc.stdout.close()
    left = set(pipe_dir.iterdir()) - before
    assert sorted(p.name[:4] for p in left) == [".loc", ".np-"], left
    return path, left


class _Gate:
    """Stops the first thread that reaches a patched function until ``go`` is set."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self._first = threading.Lock()

    def wrap(self, fn):  # type: ignore[no-untyped-def]
        def gated(*args, **kw):  # type: ignore[no-untyped-def]
            if self._first.acquire(blocking=False):
                self.reached.set()
                assert self.go.wait(30), "the gate was never opened"
            return fn(*args, **kw)
        return gated


def _serve_in_thread(name: str, kind: str) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        acl = npipe.Acl.allow(everyone=True) if kind == "shared" else npipe.Acl()
        try:
            out.append(npipe.grpc.add_pipe_port(server, name, acl=acl))
            server.start()
            out.append(server)
        except BaseException as e:
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("kind", ["grpc", "shared"])
def test_prune_first_then_a_new_server_on_the_stale_name(
    pipe_dir: Path, machine_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The prune holds the stale name's lock (stopped inside it) while a new server
    comes for the name: the server waits for the lock, the prune removes exactly what
    the dead server left, and then the server takes the name."""
    old, left = _killed("contested", kind, pipe_dir)
    gate = _Gate()
    monkeypatch.setattr(reclaim, "read_record", gate.wrap(reclaim.read_record))
    pruned: list[Path] = []
    pruner = threading.Thread(target=_extend_with_reclaim, args=(pruned,), daemon=True)
    pruner.start()
    assert gate.reached.wait(30)
    server_thread, out = _serve_in_thread("contested", kind)
    server_thread.join(0.5)
    assert server_thread.is_alive() and not out, "the server waits for the name's lock"
    gate.go.set()
    pruner.join(30)
    server_thread.join(30)
    port, server = out
    try:
        assert isinstance(port, npipe.grpc.PipePort), port
        assert port.path == old and is_live(port.path)
        # What the prune removed: the dead server's lock file (it held that lock), and
        # nothing but what the dead server left (its socket, private directory, ACL note
        # and name: the new server's own start-up reclaim, which passes over the held
        # lock, may take those first). All of it is gone, and the new server serves.
        lock = next(p for p in left if p.name.startswith(".lock-"))
        dead = {old, *left, machine_dir / "contested", old.with_name(f".acl-{old.name}")}
        assert lock in pruned and set(pruned) <= dead, pruned
        assert not [p for p in left if os.path.lexists(p) and p != lock], left
        assert Path(os.readlink(machine_dir / "contested")) == port.path
        with npipe.grpc.channel("contested") as chan:
            grpc.channel_ready_future(chan).result(timeout=10)
    finally:
        server.stop(None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["grpc", "shared"])
def test_a_new_server_first_then_a_prune_on_the_stale_name(
    pipe_dir: Path, machine_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The new server holds the stale name's lock (stopped before it binds) while a
    prune runs: the prune neither waits for that lock nor touches the name's files, and
    the server then serves."""
    from npipe.local import listener

    old, _left = _killed("contested", kind, pipe_dir)
    gate = _Gate()
    monkeypatch.setattr(listener, "_bind", gate.wrap(listener._bind))
    server_thread, out = _serve_in_thread("contested", kind)
    assert gate.reached.wait(30)
    pruned: list[Path] = []
    pruner = threading.Thread(target=_extend_with_reclaim, args=(pruned,), daemon=True)
    pruner.start()
    pruner.join(15)
    assert not pruner.is_alive(), "the prune waited for the lock the server holds"
    # Nothing of the name's: its lock and socket are the server's now. (The name's old
    # link, which leads to no live socket yet, may go: the server publishes it anew.)
    assert set(pruned) <= {machine_dir / "contested"}, pruned
    gate.go.set()
    server_thread.join(30)
    port, server = out
    try:
        assert isinstance(port, npipe.grpc.PipePort), port
        assert port.path == old and is_live(port.path)
        assert Path(os.readlink(machine_dir / "contested")) == port.path
        with npipe.grpc.channel("contested") as chan:
            grpc.channel_ready_future(chan).result(timeout=10)
    finally:
        server.stop(None)  # type: ignore[attr-defined]


def _extend_with_reclaim(into: list[Path]) -> None:
    into.extend(reclaim.reclaim())


def test_pid_reuse_does_not_make_a_dead_server_look_alive() -> None:
    me = {"pid": os.getpid(), "start": process_start(os.getpid())}
    assert record_alive(me)
    assert not record_alive({**me, "start": me["start"] + 1})  # same pid, another process
    assert not record_alive({"pid": 2**22 + 1, "start": 1})  # no such process
    assert not record_alive({})


def test_a_private_directory_being_set_up_is_never_reclaimed(pipe_dir: Path) -> None:
    pipe_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fresh = private_dir(pipe_dir)  # no backend socket yet: its maker is alive
    try:
        assert fresh not in reclaim.reclaim()
        assert fresh.exists()
    finally:
        with contextlib.suppress(OSError):
            (fresh / "owner").unlink()
            fresh.rmdir()


def test_prune_as_root_takes_another_users_dead_server(
    machine_dir: Path, other: TestUser
) -> None:
    body = """
        import subprocess, sys
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        port = npipe.grpc.add_pipe_port(server, "orphan",
                                        acl=npipe.Acl.allow(everyone=True))
        server.start()
        result(str(port.path))
        os.kill(os.getpid(), 9)
    """
    child = run_python(body, user=other)
    assert child.returncode == -9
    path = Path(child.result)
    assert path.is_socket() and (machine_dir / "orphan").is_symlink()
    deadline = time.monotonic() + 5
    removed: list[Path] = []
    while path.exists() and time.monotonic() < deadline:
        removed += reclaim.reclaim_all()
    assert path in removed and machine_dir / "orphan" in removed
    assert not os.path.lexists(machine_dir / "orphan")


def test_a_killed_servers_socket_for_smbd_is_reclaimed(
    pipe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_root()
    np_dir = tmp_path / "np"
    np_dir.mkdir(mode=0o700)
    monkeypatch.setenv("NPIPE_SAMBA_NP_DIR", str(np_dir))
    proc, _path = _start("smbdead", "smb")
    proc.kill()
    proc.wait(10)
    assert proc.stdout is not None
    proc.stdout.close()
    assert (np_dir / "smbdead").is_socket() and not is_live(np_dir / "smbdead")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    npipe.grpc.add_pipe_port(server, "other")
    try:
        assert not os.path.lexists(np_dir / "smbdead")
    finally:
        server.stop(None)


def test_only_what_npipe_made_is_taken_from_tmp() -> None:
    """Directories under /tmp named like an older npipe's private ones are removed only
    if they hold nothing but what those held (a dead backend socket, relay names): never
    a demo's smbd directory or anything else that happens to share the prefix."""
    old = time.time() - 3600
    made: list[Path] = []
    try:
        for content in ("g", "smb.conf"):
            d = Path(tempfile.mkdtemp(prefix="npipe-", dir="/tmp"))
            made.append(d)
            if content == "g":
                s = socket.socket(socket.AF_UNIX)
                s.bind(str(d / "g"))
                s.close()  # bound, never listening: dead
            else:
                (d / content).write_text("[global]\n")
            os.utime(d, (old, old))
        removed = reclaim.reclaim()
        assert made[0] in removed and not made[0].exists()  # an old backend dir: dead
        assert made[1] not in removed and made[1].exists()  # not npipe's: kept
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)

