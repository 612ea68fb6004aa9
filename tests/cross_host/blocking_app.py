"""Blocking streams across hosts (tests/test_blocking_cross_host.py).

    blocking_app.py serve NAME USERS      a blocking server (npipe.create_server, smb=True):
                                          "hello CALLER #N" (N: the callers accepted so
                                          far), then an echo; "die" ends the process
    blocking_app.py SCENARIO ADDRESS      a blocking client scenario; prints its JSON result
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from typing import Any

import npipe


def serve(name: str, users: str) -> None:
    server = npipe.create_server(name, smb=True, acl=npipe.Acl.allow(users=users.split(",")))
    accepted = 0

    def one(conn: npipe.PipeSocket, who: npipe.Caller, n: int) -> None:
        with conn:
            conn.sendall(f"hello {who.name} #{n}\n".encode())
            while data := conn.recv(65536):
                if data == b"die\n":
                    os._exit(0)  # vanish mid-stream: nothing closed on the way out
                conn.sendall(data)

    def accept_loop() -> None:
        nonlocal accepted
        while True:
            try:
                conn, who = server.accept()
            except OSError:
                return
            accepted += 1
            threading.Thread(target=one, args=(conn, who, accepted), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    server.close()


def _line(conn: npipe.PipeSocket) -> str:
    f = conn.makefile("rb")
    try:
        return f.readline().decode().strip()
    finally:
        f.close()


def echo(address: str) -> dict[str, Any]:
    with npipe.connect(address, timeout=30) as conn:
        out: dict[str, Any] = {"greeting": _line(conn), "fileno": conn.fileno() >= 0}
        conn.settimeout(0.3)
        t0 = time.monotonic()
        try:
            conn.recv(10)
            out["timeout"] = "none"
        except TimeoutError:
            out["timeout"] = "raised" if time.monotonic() - t0 < 5 else "late"
        conn.settimeout(30)
        big = os.urandom(1 << 20)
        # Sent from a thread while this one reads: the echo comes back as it goes, and
        # every buffer on the way is bounded (sending 1 MiB before reading would wait for
        # ever once they are full, as with any socket).
        sender = threading.Thread(target=conn.sendall, args=(big,), daemon=True)
        sender.start()
        got = bytearray()
        buf = bytearray(65536)
        while len(got) < len(big):
            n = conn.recv_into(buf)
            assert n, len(got)
            got += buf[:n]
        sender.join(30)
        out["echo"] = bytes(got) == big
        try:
            conn.shutdown(socket.SHUT_WR)
            out["shutdown"] = "allowed"
        except OSError as e:
            out["shutdown"] = "EOPNOTSUPP" if e.errno == errno.EOPNOTSUPP else str(e)
        conn.sendall(b"after")  # still usable
        out["after"] = conn.recv(100).decode()
    return out


def refused(address: str) -> dict[str, Any]:
    try:
        npipe.connect(address, timeout=10).close()
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


def vanish(address: str) -> dict[str, Any]:
    with npipe.connect(address, timeout=30) as conn:
        greeting = _line(conn)
        conn.settimeout(45)
        conn.sendall(b"die\n")
        t0 = time.monotonic()
        try:
            end = "eof" if conn.recv(100) == b"" else "data"
        except ConnectionError as e:
            end = type(e).__name__
        except TimeoutError:
            end = "hung"
        return {"greeting": greeting, "end": end, "seconds": time.monotonic() - t0}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(globals()[sys.argv[1]](sys.argv[2])), flush=True)
