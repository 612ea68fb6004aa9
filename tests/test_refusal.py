"""A caller the ACL refuses can tell that from a crash (issue 22), as real users.

A (npipe-t1) serves a pipe whose ACL admits B (npipe-t2) only; C (npipe-t3) is refused.
C's npipe.open_connection raises AccessDenied itself (not a reset on the first read),
and the httpx transports raise httpx.ConnectError with that AccessDenied in its chain;
B gets in. A server killed with SIGKILL (its socket and ACL note left behind) is a
missing server to everyone, never a refusal; a note that is not the server's own
(another user's, or a dead server's) predicts nothing. Every process runs as its user
(see grpc_support). Needs root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from grpc_support import (
    Background,
    TestUser,
    background_python,
    run_python,
    wait_until,
)

from npipe.local.listener import note_path

pytestmark = pytest.mark.root


# Serve NAME (a stream echo, or http_apps over npipe.http) with ACL (a Python expression)
# until stdin closes; prints "SERVER READY <pid> <path>".
SERVER = """
    import asyncio
    import npipe.http
    import http_apps

    async def echo(reader, writer):
        data = await reader.read(100)
        writer.write(b"echo:" + data)
        await writer.drain()

    async def main():
        acl = {acl}
        if {kind!r} == "stream":
            server = await npipe.start_server(echo, {name!r}, acl=acl, dotnet={dotnet!r})
        else:
            server = await npipe.http.serve_asgi(http_apps.app, {name!r}, acl=acl)
        print("SERVER READY", os.getpid(), server.path, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        server.close()

    asyncio.run(main())
"""

# open_connection NAME, send "hi", read the answer: ["ok", answer] or where it failed.
STREAM_CLIENT = """
    import asyncio

    async def main():
        try:
            reader, writer = await npipe.open_connection({name!r}, server_user={server!r})
        except Exception as e:
            result(["open", type(e).__name__, str(e)])
            return
        try:
            writer.write(b"hi")
            await writer.drain()
            data = await reader.read(100)
        except Exception as e:
            result(["read", type(e).__name__, str(e)])
            return
        writer.close()
        result(["ok", data.decode()])

    asyncio.run(main())
"""

# GET /hello through npipe.http's sync and async transports: per transport
# ["ok", body] or [httpx error, message, the types in its chain].
HTTP_CLIENT = """
    import asyncio
    import httpx
    import npipe.http

    def failure(e):
        seen, kinds = e, []
        while seen is not None:
            kinds.append(type(seen).__name__)
            seen = seen.__cause__ or seen.__context__
        return [type(e).__name__, str(e), kinds]

    out = {{}}
    try:
        with httpx.Client(transport=npipe.http.Transport({name!r}, server_user={server!r}),
                          base_url="http://api", timeout=20) as client:
            out["sync"] = ["ok", client.get("/hello").text]
    except httpx.HTTPError as e:
        out["sync"] = failure(e)

    async def main():
        transport = npipe.http.AsyncTransport({name!r}, server_user={server!r})
        async with httpx.AsyncClient(transport=transport, base_url="http://api",
                                     timeout=20) as client:
            return ["ok", (await client.get("/hello")).text]

    try:
        out["async"] = asyncio.run(main())
    except httpx.HTTPError as e:
        out["async"] = failure(e)
    result(out)
"""


def _admitting(*users: TestUser, groups: tuple[int, ...] = ()) -> str:
    return f"npipe.Acl.allow(users={[u.name for u in users]!r}, groups={list(groups)!r})"


def _serve(user: TestUser, name: str, acl: str, kind: str = "stream",
           dotnet: bool = False) -> AbstractContextManager[Background]:
    body = SERVER.format(name=name, acl=acl, kind=kind, dotnet=dotnet)
    return background_python(body, user=user, ready="SERVER ")


def _ready(server: Background) -> tuple[int, Path]:
    words = server.ready_line.split(" ", 3)
    assert words[1] == "READY", server.ready_line
    return int(words[2]), Path(words[3])


def _open(user: TestUser, name: str, server: TestUser, groups: tuple[int, ...] = ()) -> list[str]:
    body = STREAM_CLIENT.format(name=name, server=server.name)
    outcome = run_python(body, user=user, groups=groups).check()
    assert isinstance(outcome, list), outcome
    return outcome


def _http(user: TestUser, name: str, server: TestUser) -> dict[str, list[object]]:
    outcome = run_python(HTTP_CLIENT.format(name=name, server=server.name), user=user).check()
    assert isinstance(outcome, dict), outcome
    return outcome


def _is_refusal(outcome: list[str], pipe: str, who: TestUser) -> None:
    """open_connection itself raised AccessDenied, in one line naming the pipe, saying
    that its ACL does not admit the caller, and who the caller is."""
    assert outcome[:2] == ["open", "AccessDenied"], outcome
    message = outcome[2]
    assert "\n" not in message
    assert pipe in message and "its ACL does not admit you" in message, message
    assert who.name in message and f"uid {who.uid}" in message, message


def test_a_caller_the_acl_refuses_gets_access_denied_at_open(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    with _serve(a, "refuses", _admitting(b)) as server:
        _pid, path = _ready(server)
        _is_refusal(_open(c, "refuses", a), r"\\.\pipe\refuses", c)
        assert _open(b, "refuses", a) == ["ok", "echo:hi"]
        # npipe ls shows the ACL in words, as before.
        done = subprocess.run([sys.executable, "-m", "npipe", "ls"], capture_output=True,
                              text=True, timeout=60, check=True)
        rows = [line.split() for line in done.stdout.splitlines()[1:]]
        assert [r[1:4] for r in rows if r[0] == "refuses"] == [
            ["live", a.name, f"owner,user:{b.name}"]
        ], done.stdout
        assert note_path(path).exists()
    assert not note_path(path).exists(), "the note goes with the server"


def test_a_group_entry_admits_its_members_only(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    """Supplementary groups count, as the front door counts SO_PEERGROUPS."""
    with _serve(a, "club", _admitting(groups=(b.gid,))) as server:
        _ready(server)
        _is_refusal(_open(c, "club", a), r"\\.\pipe\club", c)
        assert _open(c, "club", a, groups=(b.gid,)) == ["ok", "echo:hi"]
        assert _open(b, "club", a) == ["ok", "echo:hi"]  # (its primary group)


def test_the_http_transports_report_a_refusal_as_a_connect_error(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    with _serve(a, "webshop", _admitting(b), kind="http") as server:
        _ready(server)
        refused = _http(c, "webshop", a)
        for how in ("sync", "async"):
            kind, message, chain = refused[how]
            assert kind == "ConnectError", refused
            assert "AccessDenied" in chain, refused  # type: ignore[operator]
            assert r"\\.\pipe\webshop" in message and "its ACL does not admit you" in message  # type: ignore[operator]
            assert c.name in message, refused  # type: ignore[operator]
        assert _http(b, "webshop", a) == {"sync": ["ok", "hello"], "async": ["ok", "hello"]}


def test_a_killed_server_is_not_a_refusal(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    """SIGKILL leaves the socket and the ACL note behind: to the refused user as to the
    admitted one, that is a pipe with no server (PipeNotFound), never AccessDenied."""
    with _serve(a, "crashes", _admitting(b)) as server:
        pid, path = _ready(server)
        _is_refusal(_open(c, "crashes", a), r"\\.\pipe\crashes", c)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: server.proc.poll() is not None)
        assert path.exists() and note_path(path).exists(), "left behind by the kill"
        for user in (c, b):
            outcome = _open(user, "crashes", a)
            assert outcome[:2] == ["open", "PipeNotFound"], outcome
        for how, (kind, _message, chain) in _http(c, "crashes", a).items():
            assert kind == "ConnectError" and "PipeNotFound" in chain, (how, chain)
            assert "AccessDenied" not in chain, (how, chain)  # type: ignore[operator]


def test_a_server_that_closes_at_once_is_not_a_refusal(
    machine_dir: Path, a: TestUser, b: TestUser
) -> None:
    """A server that admits the caller and then closes (it failed, or chose to) is not
    reported as a refusal: the caller sees the connection end, as before."""
    body = SERVER.replace(
        "data = await reader.read(100)", "writer.close(); return"
    ).format(name="hangs-up", acl=_admitting(b), kind="stream", dotnet=False)
    with background_python(body, user=a, ready="SERVER ") as server:
        _ready(server)
        outcome = _open(b, "hangs-up", a)
        assert outcome[0] != "open" and "AccessDenied" not in outcome, outcome


def test_a_note_that_is_not_the_servers_own_predicts_nothing(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    """A note another user owns (put in the place of the server's own) is ignored: C is
    then refused only by the server itself, as before (the connection is closed), and
    npipe ls no longer shows the ACL."""
    with _serve(a, "planted", _admitting(b)) as server:
        _pid, path = _ready(server)
        note = note_path(path)
        forged = note.with_name(".forged")
        forged.write_bytes(note.read_bytes())
        os.chown(forged, c.uid, c.gid)
        os.replace(forged, note)
        outcome = _open(c, "planted", a)
        assert "AccessDenied" not in outcome, outcome
        assert outcome[0] == "read" or outcome == ["ok", ""], outcome
        assert _open(b, "planted", a) == ["ok", "echo:hi"]


def test_another_users_planted_note_cannot_keep_a_caller_out(
    machine_dir: Path, a: TestUser, b: TestUser, c: TestUser
) -> None:
    """.NET's path is in /tmp, where anyone can put a file beside a socket: C writes the
    note a server would (the right pid, socket and owner, admitting nobody), and B, whom
    the server admits, still gets in."""
    name = f"npt{os.getpid()}"
    socket_path = Path(f"/tmp/CoreFxPipe_{name}")
    planted = note_path(socket_path)
    try:
        with _serve(a, name, _admitting(b), dotnet=True) as server:
            pid, path = _ready(server)
            assert path == socket_path
            ino = os.lstat(path).st_ino
            note = {"text": "owner", "owner": a.uid, "pid": pid, "socket": ino,
                    "everyone": False, "uids": [], "gids": []}
            run_python(f"""
                with open({str(planted)!r}, "x") as f:
                    f.write({json.dumps(note)!r})
            """, user=c).check()
            assert os.lstat(planted).st_uid == c.uid
            assert _open(b, name, a) == ["ok", "echo:hi"]
    finally:
        planted.unlink(missing_ok=True)
