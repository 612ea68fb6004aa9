"""Clients for tests/test_redirector.py, run in the client's network namespace; prints
one JSON result: what was called, and who holds the SMB connection to port 445.

    python redirector_app.py grpc|blocking ADDRESS SERVER_IP
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from typing import Any

import npipe
import npipe.redirector
import npipe.smb


def smb_sockets(server_ip: str) -> tuple[list[int], list[int]]:
    """The pids that own a TCP connection to SERVER_IP:445 here, and its local ports."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dst", f"{server_ip}:445"],
                         capture_output=True, text=True, check=True).stdout
    owners = sorted({int(pid) for pid in re.findall(r"pid=(\d+)", out)})
    ports = sorted(int(m) for m in re.findall(r"\S+:(\d+)\s+\S+:445\b", out))
    return owners, ports


def redirector_pid() -> int | None:
    from npipe.local.peercred import peer_credentials
    from npipe.redirector import client

    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(client.paths().socket))
        except OSError:
            return None
        return peer_credentials(probe)[0]


def report(server_ip: str) -> dict[str, Any]:
    owners, ports = smb_sockets(server_ip)
    infos = npipe.redirector.connections() or npipe.smb.get_client().connections()
    return {"pid": os.getpid(), "redirector": redirector_pid(), "smb_owners": owners,
            "smb_ports": ports,
            "connections": [{"user": i.user, "encrypted": i.encrypted, "alive": i.alive}
                            for i in infos if i.alive]}


def grpc(address: str, server_ip: str) -> dict[str, Any]:
    import npipe.grpc

    with npipe.grpc.channel(address) as ch:
        who = json.loads(ch.unary_unary("/x.Svc/Whoami")(b"", timeout=30))
        echo = ch.unary_unary("/x.Svc/Echo")(b"ping", timeout=30) == b"ping"
        return {"who": who["account"], "echo": echo, **report(server_ip)}


def blocking(address: str, server_ip: str) -> dict[str, Any]:
    with npipe.connect(address, timeout=30) as conn:
        greeting = b""
        while not greeting.endswith(b"\n"):
            greeting += conn.recv(1)
        conn.sendall(b"hello")
        echoed = b""
        while len(echoed) < 5:
            echoed += conn.recv(5 - len(echoed))
        assert greeting.startswith(b"hello "), greeting
        return {"echo": echoed.decode(), **report(server_ip)}


if __name__ == "__main__":
    scenario, address, server_ip = sys.argv[1:]
    print(json.dumps(globals()[scenario](address, server_ip)), flush=True)
