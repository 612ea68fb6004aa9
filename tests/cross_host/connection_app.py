"""npipe.connection across hosts (tests/test_connection_cross_host.py).

    connection_app.py serve NAME USERS MODE MAX   a Listener (smb=True, authkey KEY,
                                                  pipe_mode MODE, max_message MAX) that
                                                  answers each message (see answer())
    connection_app.py SCENARIO ADDRESS MODE       a client scenario; prints its JSON result
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection as mpc
import os
import struct
import sys
import threading
import time
from typing import Any

import npipe
from npipe.connection import Client, Connection, Listener, MessageTooLarge

KEY = b"cross-host key"
events: list[str] = []  # what the server saw go wrong, for the "events" request


def answer(listener: Listener, conn: Connection) -> None:
    """Echo every message, except these requests:

    who          the caller (JSON) and listener.last_accepted's name
    send:A,B,..  messages of A, B, ... bytes (byte i of each: i % 251)
    zero / big   try to send a 0-byte / 65,536-byte message; the error's name, then "sent"
    die          vanish (os._exit) at once; die-mid: after half a message (byte mode)
    events       what went wrong on this server so far (JSON)
    """
    with conn:
        while True:
            try:
                msg = conn.recv_bytes()
            except MessageTooLarge as e:
                conn.send_bytes(b"too-large: " + str(e).encode())
                continue
            except EOFError as e:
                events.append(f"{type(e).__name__}: {e}")
                return
            if msg == b"who":
                who = conn.caller
                assert who is not None and listener.last_accepted is not None
                conn.send_bytes(json.dumps({
                    "name": who.name, "user": who.user, "uid": who.uid,
                    "transport": who.transport,
                    "last_accepted": listener.last_accepted.name}).encode())
            elif msg.startswith(b"send:"):
                for size in msg[5:].split(b","):
                    conn.send_bytes(pattern(int(size)))
            elif msg in (b"zero", b"big"):
                try:
                    conn.send_bytes(b"" if msg == b"zero" else pattern(65536))
                    conn.send_bytes(b"sent")
                except Exception as e:
                    conn.send_bytes(f"{type(e).__name__}: {e}".encode())
            elif msg == b"die":
                os._exit(0)
            elif msg == b"die-mid":
                sock = conn._transport.conn  # type: ignore[union-attr]  # (byte mode)
                sock.sendall(struct.pack("!i", 1 << 20) + b"x" * 70000)
                time.sleep(0.5)
                os._exit(0)
            elif msg == b"events":
                conn.send_bytes(json.dumps(events).encode())
            else:
                conn.send_bytes(msg)


def pattern(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def serve(name: str, users: str, mode: str, max_message: str, key: str = "key") -> None:
    """``key`` "none": no authkey, and each caller is first sent a 65,535-byte message
    (the first READ, posted with the CREATE, must take a whole message too)."""
    listener = Listener(name, KEY if key == "key" else None, smb=True,
                        acl=npipe.Acl.allow(users=users.split(",")),
                        pipe_mode=mode,  # type: ignore[arg-type]
                        max_message=int(max_message))

    def accept_loop() -> None:
        while True:
            try:
                conn = listener.accept()
            except (multiprocessing.AuthenticationError, OSError, EOFError) as e:
                if closing:
                    return
                events.append(f"{type(e).__name__}: {e}")  # (one caller's handshake)
                print(f"accept: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            if key != "key":
                conn.send_bytes(pattern(65535))
            threading.Thread(target=answer, args=(listener, conn), daemon=True).start()

    closing = False
    threading.Thread(target=accept_loop, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    closing = True
    listener.close()


def client(address: str, mode: str) -> Connection:
    if "/" not in address:  # a local pipe name (on the server's host)
        return Client(address, KEY, pipe_mode=mode)  # type: ignore[arg-type]
    return Client(address, KEY, pipe_mode=mode, timeout=30)  # type: ignore[arg-type]


def boundaries(address: str, mode: str) -> dict[str, Any]:
    sizes = [1, 1000, 65535] if mode == "message" else [0, 1, 1000, 65535, 70000, 1 << 20]
    with client(address, mode) as conn:
        out: dict[str, Any] = {"poll_idle": conn.poll(0.2)}
        conn.send_bytes(b"hello")
        out["poll_answer"] = conn.poll(30)
        out["hello"] = conn.recv_bytes().decode()
        echoed = []
        for size in sizes:
            data = os.urandom(size)
            conn.send_bytes(data)
            echoed.append(conn.recv_bytes() == data)
        out["echoed"] = echoed
        # three (or more) messages sent at once arrive as as many
        conn.send_bytes(b"send:" + ",".join(map(str, sizes)).encode())
        got = [conn.recv_bytes() for _ in sizes]
        out["sizes"] = [len(g) for g in got]
        out["intact"] = all(g == pattern(len(g)) for g in got)
        buf = bytearray(70000)
        conn.send_bytes(b"into")
        out["into"] = conn.recv_bytes_into(buf, 3) == 4 and bytes(buf[3:7]) == b"into"
        conn.send({"an": ["object", 1]})
        out["object"] = conn.recv()
    return out


def first_big(address: str, mode: str) -> dict[str, Any]:
    with Client(address, pipe_mode=mode, timeout=30) as conn:  # type: ignore[arg-type]
        first = conn.recv_bytes()
        conn.send_bytes(b"next")
        return {"first": len(first), "intact": first == pattern(65535),
                "next": conn.recv_bytes().decode()}


def limits(address: str, mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with client(address, mode) as conn:
        for what, data in (("zero", b""), ("big", b"x" * 65536)):
            try:
                conn.send_bytes(data)
                out[what] = "sent"
            except Exception as e:
                out[what] = f"{type(e).__name__}: {e}"
        conn.send_bytes(b"after")
        out["after"] = conn.recv_bytes().decode()
        for what in ("zero", "big"):  # the server's sends
            conn.send_bytes(what.encode())
            out[f"server_{what}"] = conn.recv_bytes().decode()
        conn.send_bytes(b"y" * 2000)  # over the server's max_message (1000)
        out["over_max"] = conn.recv_bytes().decode()
        conn.send_bytes(b"still")
        out["still"] = conn.recv_bytes().decode()
    return out


def who(address: str, mode: str) -> dict[str, Any]:
    with client(address, mode) as conn:
        conn.send_bytes(b"who")
        return json.loads(conn.recv_bytes())  # type: ignore[no-any-return]


def wrong_key(address: str, mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        Client(address, b"not the key", pipe_mode=mode, timeout=30).close()  # type: ignore[arg-type]
        out["wrong"] = "accepted"
    except multiprocessing.AuthenticationError as e:
        out["wrong"] = f"AuthenticationError: {e}"
    with client(address, mode) as conn:  # the listener goes on
        conn.send_bytes(b"events")
        out["events"] = json.loads(conn.recv_bytes())
    return out


def refused(address: str, mode: str) -> dict[str, Any]:
    try:
        client(address, mode).close()
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


def vanish(address: str, mode: str) -> dict[str, Any]:
    with client(address, mode) as conn:
        conn.send_bytes(b"die" if mode == "message" else b"die-mid")
        t0 = time.monotonic()
        if not conn.poll(45):
            return {"end": "hung"}
        try:
            conn.recv_bytes()
            end = "data"
        except EOFError as e:
            end = f"EOFError: {e}"
        except OSError as e:
            end = f"{type(e).__name__}: {e}"
        return {"end": end, "seconds": time.monotonic() - t0}


def vanish_mid_send(address: str, mode: str) -> dict[str, Any]:
    """Send half a message in the stdlib's framing, then vanish (byte mode)."""
    conn = npipe.connect(address)  # (blocking: no timeout)
    peer = mpc.Connection(os.dup(conn.fileno()))
    mpc.answer_challenge(peer, KEY)
    mpc.deliver_challenge(peer, KEY)
    conn.sendall(struct.pack("!i", 1 << 20) + b"z" * 70000)
    time.sleep(1)
    os._exit(0)


def stdlib_peer(address: str, mode: str) -> dict[str, Any]:
    """The standard library's own Connection over npipe.connect()'s socket (byte mode)."""
    with npipe.connect(address) as sock:  # (blocking: no timeout)
        peer = mpc.Connection(os.dup(sock.fileno()))
        try:
            mpc.answer_challenge(peer, KEY)
            mpc.deliver_challenge(peer, KEY)
            echoed = []
            for size in (0, 1, 70000, 1 << 20):
                data = os.urandom(size)
                peer.send_bytes(data)
                echoed.append(peer.recv_bytes() == data)
            peer.send({"pickled": True})
            obj = peer.recv()
            peer.send_bytes(b"send:5,0,70000")
            sizes = [len(peer.recv_bytes()) for _ in range(3)]
        finally:
            peer.close()
    return {"echoed": echoed, "object": obj, "sizes": sizes}


def events_now(address: str, mode: str) -> dict[str, Any]:
    with client(address, mode) as conn:
        conn.send_bytes(b"events")
        return {"events": json.loads(conn.recv_bytes())}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:])
    else:
        print(json.dumps(globals()[sys.argv[1]](sys.argv[2], sys.argv[3])), flush=True)
