"""The ACL note beside a local pipe's socket (npipe.local.aclnote): its format, and the
prediction a client makes from it, which must be the front door's own verdict
(Acl.allows for a local caller) and nothing when the note is not the connected
server's own. Then: every local server kind writes it (issue 22)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from concurrent import futures
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npipe.acl import OWNER_ONLY, Acl
from npipe.identity import Caller
from npipe.local.aclnote import MAX_NOTE_BYTES, AclNote, admits, build_note, parse_note

OWNER, PID, INODE = 1001, 4242, 777
LISTENER = (PID, OWNER)
SOCKET = (INODE, OWNER)


def note_for(acl: Acl, text: str = "words") -> AclNote:
    return parse_note(build_note(acl, text, owner=OWNER, pid=PID, socket=INODE))


def verdict(note: AclNote, uid: int, gid: int = 5000, groups: tuple[int, ...] = (),
            listener: tuple[int, int] = LISTENER,
            socket: tuple[int, int] = SOCKET) -> bool | None:
    return admits(note, uid=uid, gid=gid, groups=groups, listener=listener, socket=socket)


def test_a_note_round_trips_and_is_small_json() -> None:
    acl = Acl.allow(users=[1002, "CORP\\bob"], groups=[300], sids=["S-1-5-32-545"])
    raw = build_note(acl, "owner,user:t2,group:300", owner=OWNER, pid=PID, socket=INODE)
    assert len(raw) <= MAX_NOTE_BYTES and b"\n" not in raw
    assert json.loads(raw) == {
        "text": "owner,user:t2,group:300", "owner": OWNER, "pid": PID, "socket": INODE,
        "everyone": False, "uids": [1002], "gids": [300],
    }  # (Windows-style entries never admit a local caller: words only)
    assert parse_note(raw) == AclNote("owner,user:t2,group:300", OWNER, PID, INODE, False,
                                      frozenset({1002}), frozenset({300}))


def test_owner_only() -> None:
    note = note_for(OWNER_ONLY)
    assert verdict(note, OWNER) is True
    assert verdict(note, 0) is True  # root reaches any socket anyway
    assert verdict(note, 1003) is False
    assert verdict(note, 1003, gid=OWNER) is False  # a gid is not a uid


def test_uid_gid_and_supplementary_groups() -> None:
    note = note_for(Acl.allow(users=[1002], groups=[300]))
    assert verdict(note, 1002) is True
    assert verdict(note, 1003) is False
    assert verdict(note, 1003, gid=300) is True
    assert verdict(note, 1003, groups=(7, 300)) is True
    assert verdict(note, 1003, groups=(7, 301)) is False


def test_everyone() -> None:
    assert verdict(note_for(Acl.allow(everyone=True)), 1003) is True


def test_windows_entries_admit_no_local_caller() -> None:
    note = note_for(Acl.allow(users=["CORP\\bob", "bob@CORP.TEST"], sids=["S-1-1-0"]))
    assert verdict(note, 1003) is False
    assert verdict(note, OWNER) is True


@pytest.mark.parametrize("listener, socket", [
    ((PID + 1, OWNER), SOCKET),  # another process listens (the note is a dead server's)
    (LISTENER, (INODE + 1, OWNER)),  # another socket is there now
    ((PID, OWNER + 1), (INODE, OWNER + 1)),  # another user serves it
])
def test_a_note_that_is_not_the_connected_servers_own_predicts_nothing(
    listener: tuple[int, int], socket: tuple[int, int]
) -> None:
    note = note_for(OWNER_ONLY)
    assert verdict(note, 1003, listener=listener, socket=socket) is None
    assert verdict(note, OWNER, listener=listener, socket=socket) is None


GOOD = {"text": "t", "owner": 1, "pid": 1, "socket": 1, "everyone": False, "uids": [],
        "gids": []}


def test_the_good_note_of_the_next_test_predicts() -> None:
    assert parse_note(json.dumps(GOOD).encode()).predicts


@pytest.mark.parametrize("raw", [
    b"owner,user:alice",  # an older npipe's note: words only
    b"\0" * MAX_NOTE_BYTES,  # /dev/zero
    b'{"text": "owner"',  # cut short
    b'["owner"]',
    *(json.dumps({**GOOD, **bad}).encode() for bad in [
        {"text": 5}, {"owner": True}, {"everyone": 0}, {"uids": [-1]}, {"gids": ["2"]},
        {"pid": None}, {"socket": 1.5},
    ]),
])
def test_anything_else_predicts_nothing(raw: bytes) -> None:
    note = parse_note(raw)
    assert not note.predicts
    assert verdict(note, 1003, listener=(1, 1), socket=(1, 1)) is None
    if not raw.startswith((b"{", b"[")):
        assert note.text == raw.decode()  # shown by npipe ls as it is


def test_a_long_acl_is_cut_to_fit_and_still_predicts() -> None:
    acl = Acl.allow(users=list(range(2000, 2010)))
    raw = build_note(acl, "user:someone-with-a-long-name," * 100, owner=OWNER, pid=PID,
                     socket=INODE)
    assert len(raw) <= MAX_NOTE_BYTES
    note = parse_note(raw)
    assert note.text.endswith("...") and note.text.startswith("user:someone")
    assert verdict(note, 2005) is True and verdict(note, 3000) is False


def test_an_acl_too_long_to_list_keeps_its_words_only() -> None:
    acl = Acl.allow(users=list(range(100000, 100400)))
    raw = build_note(acl, "many users", owner=OWNER, pid=PID, socket=INODE)
    assert len(raw) <= MAX_NOTE_BYTES
    note = parse_note(raw)
    assert note.text == "many users" and not note.predicts
    assert verdict(note, 100005) is None


ids = st.integers(min_value=0, max_value=6)


@given(uids=st.frozensets(ids), gids=st.frozensets(ids), everyone=st.booleans(),
       uid=ids, gid=ids, groups=st.lists(ids, max_size=3))
def test_the_prediction_is_the_front_doors_verdict(
    uids: frozenset[int], gids: frozenset[int], everyone: bool, uid: int, gid: int,
    groups: list[int],
) -> None:
    acl = Acl(uids=uids, gids=gids, everyone=everyone)
    owner = 3
    note = parse_note(build_note(acl, "t", owner=owner, pid=PID, socket=INODE))
    caller = Caller.local(99, uid, gid, tuple(groups))  # what SO_PEERCRED gives the door
    assert admits(note, uid=uid, gid=gid, groups=groups, listener=(PID, owner),
                  socket=(INODE, owner)) is acl.allows(caller, owner_uid=owner)


# --- every local server kind writes it -------------------------------------------------------


def _check_note(path: Path, acl: Acl) -> None:
    from npipe.local.listener import read_acl_note, read_note

    note = read_acl_note(path, os.getuid())
    assert note is not None and note.predicts, note
    assert (note.owner, note.pid, note.socket) == (os.getuid(), os.getpid(),
                                                   os.lstat(path).st_ino)
    assert (note.uids, note.gids, note.everyone) == (acl.uids, acl.gids, acl.everyone)
    assert read_note(path, os.getuid()) == note.text  # what npipe ls shows


ACL = Acl.allow(users=[4321], groups=[4322])


@pytest.mark.skipif(sys.platform == "win32", reason="local pipes are Unix sockets here")
@pytest.mark.parametrize("where", ["machine", "pipe_dir"])
def test_stream_http_and_expose_servers_write_the_note(where: str, tmp_path: Path) -> None:
    import npipe
    import npipe.http
    from npipe.bridges.endpoint import parse_endpoint
    from npipe.bridges.expose import start_expose

    pipe_dir = tmp_path / "p" if where == "pipe_dir" else None

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        stream = await npipe.start_server(handler, "note-stream", acl=ACL, pipe_dir=pipe_dir)
        http = await npipe.http.serve_asgi(app, "note-http", acl=ACL, pipe_dir=pipe_dir)
        expose = await start_expose("note-expose", parse_endpoint("tcp:127.0.0.1:9"),
                                    acl=ACL, pipe_dir=pipe_dir)
        try:
            assert expose.server is not None
            for path in (stream.path, http.path, expose.server.path):
                _check_note(path, ACL)
        finally:
            stream.close()
            await http.aclose()
            await expose.close()

    asyncio.run(main())


@pytest.mark.skipif(sys.platform == "win32", reason="local pipes are Unix sockets here")
@pytest.mark.parametrize("caller_identity", [True, False])
def test_grpc_servers_write_the_note(caller_identity: bool) -> None:
    import grpc

    import npipe.grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    acl = ACL if caller_identity else OWNER_ONLY
    port = npipe.grpc.add_pipe_port(server, f"note-grpc-{caller_identity}", acl=acl,
                                    caller_identity=caller_identity)
    server.start()
    try:
        _check_note(port.path, acl)
    finally:
        server.stop(None).wait(5)
